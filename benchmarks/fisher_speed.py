"""Exact diagonal Fisher: per-sample autograd loop vs hf_l2sp's estimate_fisher (per-layer hooks, torch.func vmap).

    python benchmarks/fisher_speed.py            # resnet18, 64 px, 256 samples, 10 classes (several minutes)
    python benchmarks/fisher_speed.py --quick    # 32 samples (about two minutes)
    python benchmarks/fisher_speed.py --methods loop,hooks   # skip vmap (slowest) on the full size

Each method runs in its own process so that its peak resident memory (ru_maxrss) is its own. Prints samples per
second, peak RSS and the speed-up; both methods must agree (max relative difference printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(samples: int, size: int, classes: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=classes).eval()
    x = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def loop(model, x):
    """The common pattern: one backward pass per (sample, class)."""
    import torch

    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xi in x:
        logp = model(xi[None]).log_softmax(-1)[0]
        probs = logp.detach().exp()
        for k in range(len(logp)):
            model.zero_grad(set_to_none=False)
            logp[k].backward(retain_graph=True)
            for n, p in model.named_parameters():
                total[n] += probs[k] * p.grad ** 2
    return {n: t / len(x) for n, t in total.items()}


def batched(model, x, chunk, method):
    from hf_l2sp.anchor.fisher import estimate_fisher

    batches = [{"pixel_values": x[i:i + 32]} for i in range(0, len(x), 32)]
    return estimate_fisher(model, batches, "exact", chunk_size=chunk, class_chunk=10, method=method).tensors


def worker(method: str, samples: int, size: int, classes: int, chunk: int, out: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, x = make(samples, size, classes)
    start = time.perf_counter()
    result = loop(model, x) if method == "loop" else batched(model, x, chunk, method)
    seconds = time.perf_counter() - start
    save_file({k.removeprefix("timm_model."): v.contiguous() for k, v in result.items()}, out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": seconds, "samples_per_s": samples / seconds,
                      "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--methods", default="loop,hooks,vmap",
                        help="Comma-separated methods; the loop always runs first (it is the reference).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples = args.samples or (32 if args.quick else 256)
    if args.worker:
        worker(args.worker, samples, args.size, args.classes, args.chunk, args.out)
        return
    import tempfile

    from safetensors.torch import load_file

    rows, files = [], {}
    tmp = tempfile.mkdtemp()
    methods = ("loop",) + tuple(m for m in args.methods.split(",") if m and m != "loop")
    for method in methods:
        files[method] = os.path.join(tmp, f"{method}.safetensors")
        cmd = [sys.executable, __file__, "--worker", method, "--samples", str(samples), "--size", str(args.size),
               "--classes", str(args.classes), "--chunk", str(args.chunk), "--out", files[method]]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    a = load_file(files["loop"])
    worst = {}
    for m in methods[1:]:
        b = load_file(files[m])
        worst[m] = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a)
    print(f"exact Fisher, resnet18, {args.size} px, {samples} samples, {args.classes} classes, "
          f"{os.environ.get('BENCH_THREADS', '2')} threads")
    print(f"{'method':10s} {'samples/s':>10s} {'seconds':>9s} {'peak RSS MB':>12s}")
    for row in rows:
        print(f"{row['method']:10s} {row['samples_per_s']:10.2f} {row['seconds']:9.1f} {row['peak_rss_mb']:12.0f}")
    for row in rows[1:]:
        print(f"speed-up {row['method']} / loop: {row['samples_per_s'] / rows[0]['samples_per_s']:.1f}x; "
              f"max difference to the loop {worst[row['method']]:.2e} of the tensor's largest entry")


if __name__ == "__main__":
    main()
