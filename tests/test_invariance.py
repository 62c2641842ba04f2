"""One result whatever the set-up: the invariance matrix.

Model classes {TimmWrapper of a timm CNN, a native transformers ResNet (its forward takes **kwargs and drops
num_items_in_batch; BatchNorm replaced so batch statistics play no part), a native ConvNeXt, a GPT-2 causal LM on
padded sequences of 8, 2, 3 and 8 tokens (its loss divides by the window's token count; no DELTA, no FSDP2)} x
regularizers
{l2_sp, l1_sp, group_lasso_sp, l2_sp_fisher, l2_sp+delta} x set-ups {gradient accumulation 2 x 2 vs 1 x 4,
2 gloo processes x 2 vs 1 x 4, sp_mode grad vs loss with clipping engaged, FSDP2 in-place sharding under
SPTrainer}: the same weights after 3 optimizer steps, to 1e-5. The runs live in tests/invariance_runs.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import invariance_runs as runs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(setup: str, out: Path, processes: int) -> dict:
    """Run a set-up in fresh processes; on failure show every rank's output (torchrun prefixes each line)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "--tee", "3"] if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, "-m", "tests.invariance_runs", setup, str(out)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0 and out.is_file(), f"{setup} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("invariance")
    return {setup: launch(setup, folder / f"{setup}.pt", 2 if setup in ("ddp", "fsdp2") else 1)
            for setup in runs.SETUPS}


def test_every_run_is_meaningful(results):
    """Clipping engaged at every step, the penalty is active, and the weights moved: a wrong scale could not hide."""
    assert set(results["base"]) == set(runs.combinations("base"))
    assert ("gpt2_lm", "l2_sp") in results["ga2"] and ("gpt2_lm", "l2_sp") in results["ddp"]
    for key, run in results["base"].items():
        assert len(run["logs"]) == runs.STEPS, key
        assert all(log["grad_norm"] > 2 * runs.MAX_GRAD_NORM for log in run["logs"]), key
        assert all(log["sp/penalty"] > 0.1 for log in run["logs"]), key
        start = runs.build_model(key[0]).state_dict()
        moved = max((run["weights"][n] - start[n]).abs().max().item() for n in run["weights"])
        assert moved > 1e-4, key


@pytest.mark.parametrize("setup", ["ga2", "grad", "ddp", "fsdp2"])
def test_same_weights_and_logs_as_one_process_one_micro_batch(results, setup):
    assert set(results[setup]) == set(runs.combinations(setup)), setup
    for key, run in results[setup].items():
        base = results["base"][key]
        for name, expected in base["weights"].items():
            torch.testing.assert_close(run["weights"][name], expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{setup} {key} {name}: {m}")
        for got, want in zip(run["logs"], base["logs"], strict=True):
            for part in ("sp/penalty", "sp/head_penalty", "sp/distance", "sp/task_loss", "sp/delta"):
                assert (part in got) == (part in want), (setup, key, part)
                if part in want:
                    assert got[part] == pytest.approx(want[part], rel=1e-5, abs=1e-7), (setup, key, part)


@pytest.mark.parametrize("setup", ["base", "ga2", "ddp"])
def test_loss_is_task_loss_plus_penalty(results, setup):
    """`sp/task_loss` is the loss without Omega (averaged over micro-batches and processes like `loss`)."""
    for key, run in results[setup].items():
        for log in run["logs"]:
            assert log["loss"] == pytest.approx(log["sp/task_loss"] + log["sp/penalty"], rel=1e-5), (setup, key)


def test_fsdp2_loss_counts_the_whole_penalty(results):
    """Each rank's Omega covers its shards; the loss it returns still carries the whole Omega's value. (Trainer in
    the harness logs rank 0's own loss, whose task part is rank 0's half batch: a cross-entropy of about 1.)"""
    for key, run in results["fsdp2"].items():
        for log in run["logs"]:
            assert 0.2 < log["loss"] - log["sp/penalty"] < 3.0, (key, log)


def test_fsdp2_keeps_only_each_ranks_shard_of_the_anchor(results):
    for key, run in results["fsdp2"].items():
        assert run["all_dtensor"], key  # the penalty ran on the shards the optimizer steps
        assert run["anchor_bytes"] <= 0.55 * run["full_anchor_bytes"], key
        assert run["anchor_assembled_exactly"], key  # what a checkpoint saves is the whole w0
