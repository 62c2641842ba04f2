"""Tiny text models and data for the tests: random-init checkpoints saved with `save_pretrained` (the way a Hub
checkpoint arrives), a word-level tokenizer built locally, and short sentences. No downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

WORDS = "the a cat dog sat on mat ran good bad movie film great awful was is it very not and".split()
SENTENCES = ["the movie was great", "a very bad film", "the cat sat on the mat", "it was not good",
             "a great film and a good movie", "awful", "the dog ran", "it is very very good"]


def save_tokenizer(folder: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[EOS]", cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(str(folder))
    return str(folder)


VOCAB = len(WORDS) + 5


def save_distilbert_base(folder: Path, seed: int = 0) -> str:
    """A DistilBERT encoder checkpoint (no classifier, no pre_classifier), with its tokenizer."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_position_embeddings=32, pad_token_id=0, dropout=0.0, attention_dropout=0.0)
    DistilBertModel(config).save_pretrained(str(folder))
    return save_tokenizer(folder)


def save_bert_base(folder: Path, seed: int = 0) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    BertModel(config).save_pretrained(str(folder))
    return save_tokenizer(folder)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    values = dict(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=4, eos_token_id=4, pad_token_id=0)
    values.update(overrides)
    return GPT2Config(**values)


def save_gpt2_lm(folder: Path, seed: int = 0) -> str:
    """A GPT-2 causal LM checkpoint (transformers Conv1D layers, LM head tied to the token embedding)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(gpt2_config()).save_pretrained(str(folder))
    return save_tokenizer(folder)


def save_qwen2_lm(folder: Path, seed: int = 0) -> str:
    """A Qwen2 causal LM checkpoint (the quick start's family: q/k/v biases, tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save_small_lm(folder, Qwen2Config, Qwen2ForCausalLM, seed)


def save_llama_lm(folder: Path, seed: int = 0) -> str:
    """A Llama causal LM checkpoint (SmolLM2's family) with the word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_small_lm(folder, LlamaConfig, LlamaForCausalLM, seed)


def _save_small_lm(folder: Path, config_class, model_class, seed: int) -> str:
    torch.manual_seed(seed)
    config = config_class(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=4,
                          eos_token_id=4, pad_token_id=0, tie_word_embeddings=True)
    model_class(config).save_pretrained(str(folder))
    return save_tokenizer(folder)


def sft_sp_classes():
    """`SPArguments` over TRL's `SFTConfig` and `SPMixin` over its `SFTTrainer`, as the docs declare them (the test
    is skipped without trl)."""
    from dataclasses import dataclass

    import pytest

    from hf_l2sp import SPArguments, SPMixin

    trl = pytest.importorskip("trl")

    @dataclass
    class SFTSPConfig(SPArguments, trl.SFTConfig):
        pass

    class SFTSPTrainer(SPMixin, trl.SFTTrainer):
        pass

    return SFTSPConfig, SFTSPTrainer


def padded_lm_batch(lengths=(8, 2, 3, 8), seed: int = 0) -> Dataset:
    """Causal-LM rows padded to the longest, labels -100 on the pads (as DataCollatorForLanguageModeling makes)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids * mask  # pad id 0
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                              "labels": labels.tolist()}).with_format("torch")


def sentiment_dataset(tokenizer_folder: str, keep_text: bool = True) -> Dataset:
    """Tokenized sentences with a label, the raw `text` column kept (what `dataset.map(tokenize)` leaves)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    data = Dataset.from_dict({"text": SENTENCES, "label": [i % 2 for i in range(len(SENTENCES))]})
    data = data.map(lambda batch: tokenizer(batch["text"]), batched=True)
    return data if keep_text else data.remove_columns("text")
