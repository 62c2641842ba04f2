"""Mixtures of experts with the features that must keep working on their fused 3-D expert tensors: FSDP2 shards,
LoRA on the attention and on the experts (PEFT's `target_parameters`), resume, and a clear refusal where the penalty
is not defined (group lasso's output-channel groups on a fused tensor)."""

import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from hf_l2sp import SPTrainer

from .architectures import build_pair, training_rows
from .helpers import sp_config
from .test_distributed import ENV, ROOT, assert_sharded_run_equals_unsharded


@pytest.fixture
def mixtral(tmp_path):
    return build_pair("causal-lm", "mixtral", tmp_path / "source")


def _data(pair, n=4):
    return Dataset.from_list(training_rows(pair, n)).with_format("torch")


FSDP_MOE_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, {root!r})
from hf_l2sp import Reference
from hf_l2sp.anchor.parameters import resolve_parameters
from hf_l2sp.penalties.l2_sp import L2SP
from transformers import AutoModelForCausalLM

dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained({source!r})
reference = Reference.snapshot(model, [])
gen = torch.Generator().manual_seed(1)
for t in reference.tensors.values():
    t.add_(0.1 * torch.randn(t.shape, generator=gen))
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
sets = resolve_parameters(model, reference.tensors, "weights")
experts = [n for n in sets.anchored_names if ".experts." in n]
terms = L2SP(0.7, 0.3)(sets)
terms.penalty.backward()
value = terms.penalty.detach().clone()
dist.all_reduce(value)
grads = {{n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}}
if dist.get_rank() == 0:
    torch.save({{"value": value, "grads": grads, "experts": experts}}, {out!r})
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""


def test_fsdp2_shards_of_fused_expert_tensors_hold_their_part_of_the_anchor(mixtral, tmp_path):
    out = tmp_path / "moe.pt"
    script = tmp_path / "moe.py"
    script.write_text(FSDP_MOE_SCRIPT.format(root=str(ROOT), source=mixtral.source, out=str(out)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    assert len(got["experts"]) == 4  # gate_up_proj and down_proj of both layers, sharded on the expert axis
    assert_sharded_run_equals_unsharded(got, mixtral.model, [], "weights")


def test_lora_on_attention_and_fused_experts_is_measured_against_the_frozen_base(mixtral, tmp_path):
    """PEFT's LoRA on `target_parameters` (one low-rank update per expert): the logged distance is
    ||W - W0|| over every adapted weight, equal to PEFT's own delta weights, after the adapters moved."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(mixtral.model, LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, max_steps=3, learning_rate=0.5, sp_alpha=0.1,
                                                    per_device_train_batch_size=2), train_dataset=_data(mixtral))
    sets = trainer.sp_parameters()
    assert len(sets.lora) == 2 + 4  # q_proj per layer; gate_up_proj and down_proj per layer
    trainer.train()
    with torch.no_grad():
        ours = sum(float(term.squared_distance()) for term in sets.lora)
        peft = sum(float(module.get_delta_weight("default").double().square().sum())
                   for module in model.modules() if isinstance(module, LoraLayer))
    assert peft > 0 and ours == pytest.approx(peft, rel=1e-5)


def test_group_lasso_on_fused_experts_is_refused_with_what_works(mixtral, tmp_path):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match=r"group_lasso_sp.*fused by transformers.*Use l2_sp or l1_sp"):
        SPTrainer(model=mixtral.model, args=sp_config(tmp_path, regularizer="group_lasso_sp"))
    adapted = get_peft_model(mixtral.model, LoraConfig(r=2, target_parameters=["mlp.experts.down_proj"]))
    with pytest.raises(ValueError, match=r"group_lasso_sp.*LoRA on fused expert weights.*use l2_sp"):
        SPTrainer(model=adapted, args=sp_config(tmp_path, regularizer="group_lasso_sp"))


def test_resume_of_a_moe_run_equals_the_uninterrupted_run(mixtral, tmp_path):
    from transformers import AutoModelForCausalLM

    def run(out, steps, resume=None):
        model = AutoModelForCausalLM.from_pretrained(mixtral.source)
        trainer = SPTrainer(model=model, args=sp_config(tmp_path, output_dir=str(tmp_path / out), max_steps=steps,
                                                        save_strategy="steps", save_steps=2, sp_alpha=0.5,
                                                        per_device_train_batch_size=2),
                            train_dataset=_data(mixtral, 8))
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    whole = run("whole", 4)
    run("part", 2)
    resumed = run("part", 4, resume=str(tmp_path / "part" / "checkpoint-2"))
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7)
