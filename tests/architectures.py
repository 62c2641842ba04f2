"""Tiny random checkpoints of every architecture transformers' auto mappings list, for the S sweep.

`tiny_config` shrinks a model type's default config through the names transformers' configs share (and their
`attribute_map` aliases), sub-configs included; `build_pair` saves a source checkpoint and loads the task model from
it as a user would (`from_pretrained`), with transformers' own loading report: the oracle for which tensors are new.
A pair plain transformers cannot build this way (a required extra package, a config these sizes break, more than
`MAX_VALUES` values) is skipped: the sweep counts pairs exact out of pairs buildable.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

#: Task -> the auto mapping (names table) of transformers' models for it.
TASKS = {
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
}
#: Tasks whose source checkpoint is the base model (the task head is then new, as in fine-tuning); the language
#: models are saved and reloaded as they are (tied heads and fused experts then go through a real round trip).
HEAD_TASKS = ("sequence-classification", "token-classification", "image-classification", "audio-classification")
MAX_VALUES = 3_000_000

_SMALL = {
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 64, "max_position_embeddings": 64,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "n_shared_experts": 1,
    "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "d_model": 16, "d_ff": 32, "d_kv": 8, "num_layers": 2,
    "num_decoder_layers": 1, "num_heads": 2, "image_size": 32, "patch_size": 8, "num_channels": 3,
    "embed_dim": 16, "hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 16, "num_labels": 3,
    "conv_dim": [16, 16], "conv_stride": [5, 4], "conv_kernel": [10, 8], "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2, "num_feat_extract_layers": 2, "tdnn_dim": [16, 16],
    "tdnn_kernel": [3, 3], "tdnn_dilation": [1, 1], "xvector_output_dim": 16, "proj_codevector_dim": 16,
    "codevector_dim": 16, "classifier_proj_size": 16, "first_k_dense_replace": 1, "kv_lora_rank": 8,
    "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "layer_types": None,
}


def tiny_config(model_type: str):
    """The default config of `model_type` at tiny sizes (each name set only where the config has it)."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    _shrink(config)
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id or 0  # T5's default config leaves it unset
    return config


def _shrink(config) -> None:
    for key, value in _SMALL.items():
        if hasattr(config, key) and value is not None:
            current = getattr(config, key)
            if isinstance(current, list) and not isinstance(value, list):
                continue
            if isinstance(value, list) and isinstance(current, list) and len(current) != len(value):
                if key in ("hidden_sizes", "depths", "embed_dim"):
                    value = value[:1] * len(current) if key != "hidden_sizes" else [8 * (i + 1) for i in
                                                                                        range(len(current))]
                else:
                    continue
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None and hasattr(config, "num_hidden_layers"):
        with contextlib.suppress(Exception):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
    for key in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub)


@dataclass
class Pair:
    task: str
    model_type: str
    class_name: str
    source: str  # the saved source checkpoint folder
    model: torch.nn.Module  # the task model as `from_pretrained` loaded it
    missing: set[str]  # transformers' own report: model tensors not in the checkpoint (newly initialised)


def build_pair(task: str, model_type: str, folder: Path) -> Pair | None:
    """Save a tiny source checkpoint and load the task model from it; None when plain transformers cannot."""
    import transformers
    from transformers.models.auto import modeling_auto

    class_name = getattr(modeling_auto, TASKS[task])[model_type]
    class_name = class_name[0] if isinstance(class_name, (tuple, list)) else class_name
    task_class = getattr(transformers, class_name, None)
    base_name = modeling_auto.MODEL_MAPPING_NAMES.get(model_type)
    base_name = base_name[0] if isinstance(base_name, (tuple, list)) else base_name
    base_class = getattr(transformers, base_name, None) if task in HEAD_TASKS and base_name else task_class
    if task_class is None or base_class is None:
        return None
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.manual_seed(0)
            config = tiny_config(model_type)
            with torch.device("meta"):  # sized before any memory is spent: a config these sizes miss can be huge
                size = sum(p.numel() for p in base_class(config).parameters())
            if size > MAX_VALUES:
                return None
            source = base_class(config)
            source.save_pretrained(folder)
            model, info = task_class.from_pretrained(folder, output_loading_info=True)
    except Exception:  # noqa: BLE001 - any failure of transformers itself means "not buildable here"
        return None
    finally:
        quiet.setLevel(level)
    return Pair(task, model_type, class_name, str(folder), model, set(info["missing_keys"]))


def pairs(tasks=TASKS) -> list[tuple[str, str]]:
    """Every (task, model_type) the auto mappings list."""
    from transformers.models.auto import modeling_auto

    return [(task, model_type) for task in tasks for model_type in sorted(getattr(modeling_auto, TASKS[task]))]


def check_pair(pair: Pair, alpha: float = 0.3, beta: float = 0.7) -> list[str]:
    """What is wrong with SPTrainer's S on `pair` (empty: exact). Checks, against transformers' own load report:
    the new tensors; every anchor, bit for bit, between the snapshot and the checkpoint read back through the
    conversions; L2-SP against its closed form in float64 after the weights move; and its gradient step."""
    from hf_l2sp.anchor.parameters import resolve_parameters
    from hf_l2sp.anchor.reference import Reference
    from hf_l2sp.loading.model_parts import canonical_name, find_head_modules
    from hf_l2sp.loading.new_tensors import find_new_tensors
    from hf_l2sp.penalties.l2_sp import L2SP

    model = pair.model
    problems = []
    try:
        head = find_head_modules(model)
    except ValueError:  # SPTrainer's documented default: no detectable head, nothing new beyond the checkpoint's
        head = []
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    trainable = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    head_names = {n for n in trainable if any(n == m or n.startswith(m + ".") for m in head)}
    expected_new = {n for n, p in trainable.items() if all(a in pair.missing for a in names_of[id(p)])} | head_names
    new = find_new_tensors(model, head)
    if set(new.names) != expected_new:
        problems.append(f"new: {sorted(set(new.names) ^ expected_new)[:4]} differ from transformers' load report")
    snapshot = Reference.snapshot(model, head, "cpu", new_names=new.names, resized=new.resized)
    try:
        read = Reference.from_checkpoint(pair.source, model, head, "cpu", new_names=new.names)
    except ValueError as err:
        return [*problems, f"sp_reference: {err}"]
    # sp_reference anchors a head the reference holds with the same shape (S is what it holds); the snapshot keeps
    # the detected task head new (warned): compare outside the head.
    anchored = set(snapshot.tensors) & set(trainable) - head_names
    if anchored != set(read.tensors) & set(trainable) - head_names:
        problems.append(f"anchored sets differ: {sorted(anchored ^ set(read.tensors))[:4]}")
    unequal = [n for n in anchored & set(read.tensors) if not torch.equal(snapshot.tensors[n], read.tensors[n])]
    if unequal:
        problems.append(f"anchors not bit-exact: {unequal[:4]}")
    start = {n: p.detach().double().clone() for n, p in trainable.items()}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.01 * torch.randn_like(p))
    sets = resolve_parameters(model, snapshot.tensors, "all")
    terms = L2SP(alpha=alpha, beta=beta)(sets)
    value = float(terms.penalty.detach())
    closed = sum(alpha / 2 * (p.detach().double() - start[n]).square().sum() for n, p in trainable.items()
                 if n not in expected_new) + sum(beta / 2 * p.detach().double().square().sum()
                                                 for n, p in trainable.items() if n in expected_new)
    if abs(value - float(closed)) > 1e-6 * max(float(closed), 1e-12):
        problems.append(f"penalty {value:.9g} vs closed form {float(closed):.9g}")
    for p in trainable.values():
        p.grad = None
    terms.penalty.backward()
    for n, p in trainable.items():
        want = beta * p.detach().double() if n in expected_new else alpha * (p.detach().double() - start[n])
        if p.grad is None or not torch.allclose(p.grad.double(), want, rtol=1e-5, atol=1e-7):
            problems.append(f"gradient of {n} is not the closed form")
            break
    return problems


def training_rows(pair: Pair, n: int = 2) -> list[dict]:
    """`n` rows of inputs and labels the task model trains on (token ids, pixels or a waveform)."""
    config = pair.model.config
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 64)
    ids = torch.randint(4, min(vocab, 60), (n, 8), generator=gen)
    labels = torch.randint(0, getattr(config, "num_labels", 2), (n,), generator=gen)
    if pair.task in ("causal-lm", "masked-lm", "seq2seq-lm"):
        return [{"input_ids": row, "labels": row} for row in ids]
    if pair.task == "token-classification":
        return [{"input_ids": row, "labels": row % config.num_labels} for row in ids]
    if pair.task == "sequence-classification":
        return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]
    if pair.task == "image-classification":
        vision = getattr(config, "vision_config", config)
        size, channels = vision.image_size, vision.num_channels
        size = size if isinstance(size, int) else size[0]
        return [{"pixel_values": torch.randn(channels, size, size, generator=gen), "labels": label}
                for label in labels]
    if pair.task == "audio-classification":
        return [{"input_values": torch.randn(4000, generator=gen), "labels": label} for label in labels]
    raise ValueError(pair.task)
