"""The penalty costs the anchor and nothing model-sized besides: in every mode, dtype and weight penalty, the peak
memory a penalty step adds is at most 0.1 x the bytes of S (here one large tensor).

Measured in a fresh process as the rise of its peak resident memory (VmHWM, reset through /proc/self/clear_refs)
over one penalty step, with `MALLOC_MMAP_THRESHOLD_` set so that freed large blocks go back to the system and the
peak follows the live tensors. Gradients exist before the step (as after a backward pass), so what is measured is
what the penalty itself allocates, and holds from its forward pass to its backward pass.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, re, sys
import torch
sys.path.insert(0, sys.argv[1])
from hf_l2sp.anchor.parameters import resolve_parameters
from hf_l2sp.penalties.group_lasso_sp import GroupLassoSP
from hf_l2sp.penalties.l1_sp import L1SP
from hf_l2sp.penalties.l2 import L2
from hf_l2sp.penalties.l2_sp import L2SP
from hf_l2sp.penalties.none import NoRegularizer
from hf_l2sp.penalties.weight import QuadraticForm
from hf_l2sp.training.optimizer_side import OptimizerSidePenalty

def peak():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

torch.set_num_threads(1)
results = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    model = torch.nn.Linear(5000, 10000, bias=False).to(dtype)  # S: one 50 M-value tensor
    with torch.no_grad():
        anchor = model.weight.detach().clone()
        model.weight.add_(0.01)
    model.weight.grad = torch.zeros_like(model.weight)
    sets = resolve_parameters(model, {"weight": anchor}, "all")
    s_bytes = model.weight.numel() * model.weight.element_size()
    fisher = [torch.rand(anchor.shape, dtype=torch.float32)]
    cases = [(name, "loss", reg) for name, reg in (("l2_sp", L2SP(0.1)), ("l2", L2(0.1)), ("l1_sp", L1SP(0.1)),
                                                 ("group_lasso_sp", GroupLassoSP(0.1)))]
    cases += [(name, mode, form) for mode in ("grad", "decoupled") for name, form in (
        ("l2_sp", QuadraticForm(0.1, True, None, 0.0)), ("l2", QuadraticForm(0.1, False, None, 0.0)),
        ("l2_sp_fisher", QuadraticForm(0.1, True, fisher, 0.0)))]
    cases += [("none", "log", NoRegularizer()), ("l2_sp alpha 0", "log", L2SP(0.0, 0.1))]
    for name, mode, penalty in cases:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        if mode == "log":  # 'none' and zero coefficients: the distance alone, at logging steps
            reset(); start = peak()
            penalty(sets)
        elif mode == "loss":
            reset(); start = peak()
            penalty(sets).penalty.backward()
        else:
            side = OptimizerSidePenalty(mode, penalty, sets, on_terms=lambda terms: None)
            reset(); start = peak()
            side._hook(optimizer, (), {})
        results.append({"dtype": str(dtype), "penalty": name, "mode": mode, "extra": peak() - start,
                        "s_bytes": s_bytes})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def measurements(tmp_path_factory):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    script = tmp_path_factory.mktemp("memory") / "measure.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_mode_dtype_and_penalty_allocates_at_most_a_tenth_of_s(measurements):
    assert len(measurements) == 3 * 12
    over = [m for m in measurements if m["extra"] > 0.1 * m["s_bytes"]]
    assert over == [], [f"{m['penalty']} {m['mode']} {m['dtype']}: {m['extra'] / m['s_bytes']:.2f} x S"
                        for m in over]


def test_pieces_are_cache_sized_on_a_cpu_and_few_on_an_accelerator():
    """A GPU waits on kernel launches: there a large set is walked in about PIECES_PER_PASS pieces (each small
    enough for the memory bound above), on a CPU in cache-sized ones."""
    from hf_l2sp.penalties.streaming import PIECE_VALUES, PIECES_PER_PASS, piece_budget, pieces

    numels = [50_000_000, 1000, 3]
    assert piece_budget(numels, torch.device("cpu")) == PIECE_VALUES
    budget = piece_budget(numels, torch.device("cuda"))
    assert budget == sum(numels) // PIECES_PER_PASS
    assert len(list(pieces(numels, budget=budget))) <= PIECES_PER_PASS + 2
    assert piece_budget([1000], torch.device("cuda")) == PIECE_VALUES  # small sets: never below the CPU size
