"""What a step of `sp_mode` grad / decoupled costs with and without Omega's value, on GPT-2-small shapes.

    python benchmarks/side_pass.py              # about 2 minutes on 2 CPU cores
    python benchmarks/side_pass.py --rounds 5   # fewer pairs

Times `OptimizerSidePenalty`'s pass over the 148 tensors of a GPT-2-small-shaped parameter set (124 M values) in
fp32 and bf16: a step that measures Omega (a step that logs: one piecewise pass giving the value and the update)
against a step that does not (the update alone: for `grad` the piecewise pass without its norms, for `decoupled`
one multi-tensor lerp toward w0). The two run in alternating order in one process; the table gives the median time
of each and the paired median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_l2sp.anchor.parameters import SPParameters
from hf_l2sp.penalties.weight import QuadraticForm
from hf_l2sp.training.optimizer_side import OptimizerSidePenalty


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    hidden, blocks = 768, 12
    shapes = [(50257, hidden), (1024, hidden)]
    for _ in range(blocks):
        shapes += [(hidden,), (hidden,), (hidden, 3 * hidden), (3 * hidden,), (hidden, hidden), (hidden,),
                   (hidden,), (hidden,), (hidden, 4 * hidden), (4 * hidden,), (4 * hidden, hidden), (hidden,)]
    return shapes + [(hidden,), (hidden,)]


def build(dtype: torch.dtype):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype) * 0.02) for shape in gpt2_small_shapes()]
    anchors = [(p.detach() + 0.001 * torch.randn_like(p)).to(dtype) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    names = [f"p{i}" for i in range(len(params))]
    sets = SPParameters(anchored_names=names, anchored_keys=names, anchored=params, anchors=anchors, head_names=[],
                        head=[])
    return params, sets, torch.optim.SGD(params, lr=1e-4)


def timed(side: OptimizerSidePenalty, optimizer, measure: bool) -> float:
    side._measure = lambda: measure
    start = time.perf_counter()
    if side.mode == "grad":
        side._added_at = object()  # a new step each time
        side.add_gradient(optimizer)
    else:
        side._hook(optimizer, (), {})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    options = parser.parse_args()
    print("| mode | dtype | step that logs (ms) | step that does not (ms) | paired ratio |\n| --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        params, sets, optimizer = build(dtype)
        for mode in ("grad", "decoupled"):
            side = OptimizerSidePenalty(mode, QuadraticForm(0.01, True, None, 0.0), sets, on_terms=lambda t: None)
            timed(side, optimizer, True), timed(side, optimizer, False)  # warm-up
            pairs = []
            for i in range(options.rounds):
                order = (True, False) if i % 2 == 0 else (False, True)
                got = {measure: timed(side, optimizer, measure) for measure in order}
                pairs.append((got[True], got[False]))
            logs, quiet = (statistics.median(p[k] for p in pairs) * 1e3 for k in (0, 1))
            ratio = statistics.median(q / m for m, q in pairs)
            print(f"| {mode} | {str(dtype).removeprefix('torch.')} | {logs:.1f} | {quiet:.1f} | {ratio:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
