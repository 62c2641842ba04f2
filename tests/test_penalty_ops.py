"""The penalty's operations per training step do not grow with the number of tensors.

On a GPU every operation is a kernel launch the CPU has to issue, so a penalty that loops over tensors costs in
proportion to their number, whatever its bytes. Counted here with a `TorchDispatchMode` over the second step of a
real `SPTrainer` run (forward, backward, optimizer step), as the aten compute operations the penalised run
dispatches beyond the same run without a penalty; operations that only make views (view, slice, split, ...) are
left out, as they launch nothing. A model of 6 layers and one of 24 (four times the tensors) must give the same
count within a few operations, in every mode and dtype, for the LoRA form too, and with the pieces an accelerator
walks the set in.
"""

import collections

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_l2sp import SPConfig, SPTrainer
from hf_l2sp.penalties import streaming

from .text_models import gpt2_config

VIEWS = {"view", "_unsafe_view", "slice", "select", "reshape", "as_strided", "detach", "alias", "t", "expand",
         "split", "split_with_sizes", "unbind", "unsqueeze", "squeeze", "permute", "transpose", "_reshape_alias",
         "lift_fresh", "empty", "empty_like", "empty_strided", "_local_scalar_dense"}
SLACK = 4  # ops the two sizes may differ by (none seen here; a per-tensor loop adds at least one per tensor)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.rstrip("_") not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class CountSecondStep(TrainerCallback):
    """Counts the second step (the first one builds optimizer state and caches)."""

    def __init__(self):
        self.counter, self.ops = None, None
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.counter = OpCounter()
            self.counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.counter is not None and self.ops is None:
            self.counter.__exit__(None, None, None)
            self.ops = self.counter.ops


def step_ops(model, tmp_path, max_steps=2, **sp) -> collections.Counter:
    """The ops of step 2; of 2 steps (the default), step 2 is the last, which measures Omega's value in every mode."""
    rows = [[5, 6, 7, 8] * 2] * 8
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    counter = CountSecondStep()
    args = SPConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, report_to="none",
                    logging_steps=100, save_strategy="no", disable_tqdm=True, use_cpu=True, **sp)
    SPTrainer(model=model, args=args, train_dataset=data, callbacks=[counter]).train()
    return counter.ops


def gpt2(layers: int, bf16: bool):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(n_layer=layers))
    return model.to(torch.bfloat16) if bf16 else model


def lora_llama(layers: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


_BASELINES: dict[tuple, collections.Counter] = {}


def _baseline(kind: str, layers: int, bf16: bool, tmp_path_factory) -> collections.Counter:
    key = (kind, layers, bf16)
    if key not in _BASELINES:
        model = lora_llama(layers) if kind == "lora" else gpt2(layers, bf16)
        _BASELINES[key] = step_ops(model, tmp_path_factory.mktemp("none"), regularizer="none")
    return _BASELINES[key]


def penalty_ops(kind, layers, bf16, tmp_path_factory, **sp) -> tuple[int, collections.Counter]:
    model = lora_llama(layers) if kind == "lora" else gpt2(layers, bf16)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    extra = step_ops(model, tmp_path_factory.mktemp("sp"), **sp)
    extra.subtract(_baseline(kind, layers, bf16, tmp_path_factory))
    return tensors, extra


def assert_flat(kind, bf16, tmp_path_factory, bound, **sp):
    (small_tensors, small), (large_tensors, large) = (penalty_ops(kind, n, bf16, tmp_path_factory, **sp)
                                                      for n in (6, 24))
    assert large_tensors >= 3 * small_tensors
    total_small, total_large = sum(small.values()), sum(large.values())
    detail = f"6 layers: {dict(+small)}; 24 layers: {dict(+large)}"
    assert abs(total_large - total_small) <= SLACK, detail
    assert 0 < total_large <= bound, detail
    return total_small, total_large


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["loss", "grad", "decoupled"])
def test_l2_sp_ops_per_step_do_not_grow_with_the_tensors(tmp_path_factory, mode, bf16):
    assert_flat("gpt2", bf16, tmp_path_factory, 48, regularizer="l2_sp", sp_mode=mode, sp_alpha=0.1)


@pytest.mark.parametrize("regularizer,mode,bf16", [
    ("l2", "loss", False), ("l1_sp", "loss", False), ("group_lasso_sp", "loss", False),
    ("l1_sp", "loss", True), ("group_lasso_sp", "loss", True), ("l2", "decoupled", True)])
def test_other_weight_penalties_do_not_grow_with_the_tensors(tmp_path_factory, regularizer, mode, bf16):
    assert_flat("gpt2", bf16, tmp_path_factory, 96, regularizer=regularizer, sp_mode=mode, sp_alpha=0.1)


def test_lora_form_ops_grow_with_the_shapes_not_the_layers(tmp_path_factory):
    """q and v adapters of a Llama: two shapes, whatever the number of layers (batched products per shape, the
    gradient added to `.grad` with one multi-tensor addition per shape and factor)."""
    assert_flat("lora", False, tmp_path_factory, 80, regularizer="l2_sp", sp_alpha=0.1)


def test_accelerator_pieces_cost_a_bounded_number_of_ops_per_piece(tmp_path_factory, monkeypatch):
    """With the pieces an accelerator walks (packed, 1/PIECES_PER_PASS of the set each; forced here on the CPU, with
    a floor small enough for these models), the pieces are as many for 24 layers as for 6 and each costs a bounded
    number of ops (which of them runs depends on whether a piece spans several tensors: a concatenation, or a view),
    so the count per step has a bound that does not depend on the number of tensors."""
    monkeypatch.setattr(streaming, "on_accelerator", lambda device: True)
    monkeypatch.setattr(streaming, "PIECE_VALUES", 64)
    counts = {}
    for layers in (6, 24):
        numels = [p.numel() for p in gpt2(layers, False).parameters()]
        n_pieces = len(list(streaming.device_pieces(numels, torch.device("cpu"))))
        assert streaming.PIECES_PER_PASS <= n_pieces <= streaming.PIECES_PER_PASS + 1
        for mode in ("loss", "grad", "decoupled"):
            _, extra = penalty_ops("gpt2", layers, False, tmp_path_factory, regularizer="l2_sp", sp_mode=mode,
                                   sp_alpha=0.1)
            counts[layers, mode] = (n_pieces, sum(extra.values()))
    per_piece = {"loss": 11, "grad": 8, "decoupled": 8}  # measured: at most 9.7, 7.0 and 7.0
    for (layers, mode), (n_pieces, ops) in counts.items():
        assert ops <= per_piece[mode] * n_pieces, counts


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["grad", "decoupled"])
def test_a_step_that_does_not_log_computes_no_value(tmp_path_factory, mode, bf16):
    """Where Omega acts in the optimizer step, a step that neither logs nor ends the run only updates: no norm, no
    sum; `decoupled` is then one lerp toward w0 for the anchored tensors and one scaling for the head, whatever
    their number. Step 2 of 3 (logging_steps 100) against the same step of a run without a penalty."""
    counts = {}
    for layers in (6, 24):
        sp = {"regularizer": "l2_sp", "sp_mode": mode, "sp_alpha": 0.1, "sp_beta": 0.1}
        extra = step_ops(gpt2(layers, bf16), tmp_path_factory.mktemp("sp"), max_steps=3, **sp)
        extra.subtract(step_ops(gpt2(layers, bf16), tmp_path_factory.mktemp("none"), max_steps=3,
                                regularizer="none"))
        counts[layers] = +extra
    assert counts[6] == counts[24], counts
    assert not {name for name in counts[24] if "norm" in name or name.startswith("sum")}, counts
    if mode == "decoupled":
        # GPT-2's head is tied to the embedding: the anchored set alone, one lerp (tensors all in the model's dtype)
        assert counts[24] == {"_foreach_lerp_": 1}, counts
    else:
        assert 0 < sum(counts[24].values()) <= 8, counts
