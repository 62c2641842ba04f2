"""Do denormal floats slow the study's runs? The same runs with torch.set_flush_denormal off and on, one thread.

    python benchmarks/study_denormal.py           # three study runs, each twice per setting (about 5 minutes)

Runs whose weights or activations decay toward zero (strong weight decay, collapsed training) can produce denormal
floats, which x86 CPUs handle many times slower. `hf-l2sp study` flushes them by default; this measures what that
buys. Prints wall seconds per run and the off/on ratio.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    import torch

    from hf_l2sp.study.protocol import default_settings, full_plan
    from hf_l2sp.study.runner import Study
    from hf_l2sp.study.runs import to_trial
    from hf_l2sp.tuning.engine import configure_process, run_trial

    configure_process(1, True)
    far = default_settings()[0]
    study = Study(full_plan(), tempfile.mkdtemp())
    cases = {
        "none, lr 0.01 (study's choice)": study.spec("final", far, None, "none", 20, 0, 0.01, 0.0),
        "l2 alpha=0.1 (strong decay)": study.spec("final", far, None, "l2", 20, 0, 0.01, 0.1),
        "none, lr 0.1 (collapses)": study.spec("final", far, None, "none", 20, 0, 0.1, 0.0),
    }
    print(f"far_digits, 20 images/class, {torch.get_num_threads()} thread; wall seconds per run")
    print(f"{'run':34s} {'flush off':>10s} {'flush on':>10s} {'off/on':>7s}")
    for label, spec in cases.items():
        times = {True: [], False: []}
        for flush in (False, True, False, True):
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            run_trial(to_trial(spec))
            times[flush].append(time.perf_counter() - start)
        off, on = statistics.fmean(times[False]), statistics.fmean(times[True])
        print(f"{label:34s} {off:10.1f} {on:10.1f} {off / on:7.2f}")


if __name__ == "__main__":
    main()
