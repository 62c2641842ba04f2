"""How far the fine-tuned backbone moved from its starting point, per layer and per stage (the paper's analysis).

For every anchored tensor: distance ||w - w0||_2, reference norm ||w0||_2 and relative distance ||w - w0|| / ||w0||.
Stages come from `stages.stage_modules` (timm's `feature_info`, or a transformers CNN's `encoder.stages`), else the
model's repeated blocks (a transformer's layers); tensors before the first stage are `stem`, after the last `head`.
Stage and total distances are Euclidean over their tensors.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..anchor.parameters import anchored_rows, rows_view
from ..loading.model_parts import canonical_name, unwrap_model
from ..loading.stages import block_modules, stage_modules
from ..utils.logs import announce

logger = logging.getLogger(__name__)
DRIFT_JSON = "drift.json"
DRIFT_PNG = "drift.png"


def compute_drift(model: nn.Module, reference: dict[str, Tensor], penalised: set[str] | None = None,
                  values: dict[str, Tensor] | None = None) -> dict:
    """Per-layer and per-stage drift of `model` from `reference` (canonical name -> w0).

    `values` (canonical name -> tensor) replaces the model's own parameters, e.g. the full state dict gathered from
    FSDP2 shards; names missing from it are skipped.
    """
    stage_of = _StageTracker(stage_modules(model) or block_modules(model))
    layers, stage_sums = [], {}
    with torch.no_grad():
        for depth, (name, param) in enumerate(
                (canonical_name(n), p) for n, p in unwrap_model(model).named_parameters()):
            stage = stage_of(name)
            if values is not None:
                param = values.get(name)
            anchor = reference.get(name)
            rows = False if param is None or anchor is None else anchored_rows(anchor, param)
            if rows is False:
                continue
            param = rows_view(param, rows)  # a resized tensor: its pretrained rows
            diff = param.detach().float().cpu() - anchor.detach().float().cpu()
            sq_dist, sq_ref = diff.square().sum().item(), anchor.float().square().sum().item()
            layers.append({"name": name, "stage": stage, "depth": depth, "numel": param.numel(),
                           "distance": math.sqrt(sq_dist), "reference_norm": math.sqrt(sq_ref),
                           "relative_distance": math.sqrt(sq_dist) / math.sqrt(sq_ref) if sq_ref > 0 else None,
                           "penalised": None if penalised is None else name in penalised})
            sums = stage_sums.setdefault(stage, [0.0, 0.0, 0])
            sums[0], sums[1], sums[2] = sums[0] + sq_dist, sums[1] + sq_ref, sums[2] + param.numel()
    stage_rows = [_row(stage, *sums) for stage, sums in stage_sums.items()]
    total = [sum(s[i] for s in stage_sums.values()) for i in range(3)]
    return {"layers": layers, "stages": stage_rows, "total": _row("total", *total)}


def adapter_drift(terms) -> list[dict]:
    """One row per LoRA layer: ||W - W0|| = s ||B A|| (from the factors), ||W0|| and their ratio."""
    rows = []
    with torch.no_grad():
        for term in terms:
            distance = float(term.squared_distance().clamp_min(0).sqrt())
            norm = float(term.base_weight.float().norm())
            rows.append({"name": term.name, "distance": distance, "reference_norm": norm,
                         "relative_distance": distance / norm if norm > 0 else None})
    return rows


def _row(stage: str, sq_dist: float, sq_ref: float, numel: int) -> dict:
    return {"stage": stage, "numel": numel, "distance": math.sqrt(sq_dist), "reference_norm": math.sqrt(sq_ref),
            "relative_distance": math.sqrt(sq_dist) / math.sqrt(sq_ref) if sq_ref > 0 else None}


class _StageTracker:
    """Assigns tensors, walked in forward (parameter) order, to stem / a stage / head."""

    def __init__(self, stages: list[str]):
        self.stages, self.current, self.after_last = stages, "stem", False

    def __call__(self, name: str) -> str:
        if not self.stages:  # not a timm model: the first module below the base prefix
            parts = name.split(".")
            return parts[1] if parts[0] == "timm_model" and len(parts) > 2 else parts[0]
        hit = next((p for p in self.stages if name == p or name.startswith(p + ".")), None)
        if hit is not None:
            self.current = hit.removeprefix("timm_model.")
            self.after_last = hit == self.stages[-1]
        elif self.after_last:
            self.current = "head"
        return self.current


def save_drift(drift: dict, folder: str | Path, title: str = "") -> tuple[Path, Path | None]:
    """Write drift.json and, when matplotlib is installed, drift.png (relative distance per layer vs depth).

    matplotlib is optional (the `demo` extra): without it the plot is skipped with one logged line, never an error
    after training.
    """
    folder = Path(folder)
    json_path, png_path = folder / DRIFT_JSON, folder / DRIFT_PNG
    try:
        import matplotlib
    except ImportError:
        announce(logger, f"hf_l2sp: matplotlib is not installed; {DRIFT_PNG} skipped (drift.json has the numbers).")
        json_path.write_text(json.dumps(drift, indent=2))
        return json_path, None
    drift["plot"] = DRIFT_PNG  # the model card shows the plot only when this is set
    json_path.write_text(json.dumps(drift, indent=2))
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [row for row in drift["layers"] if row["relative_distance"] is not None]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    if layers:
        ax.plot(range(len(layers)), [r["relative_distance"] for r in layers], marker=".", lw=1)
        previous = None
        for i, row in enumerate(layers):
            if row["stage"] != previous:
                ax.axvline(i, color="0.85", lw=0.8)
                ax.text(i, 1.0, f" {row['stage']}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
                previous = row["stage"]
        if max(r["relative_distance"] for r in layers) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("layer (parameter tensors in forward order)")
    ax.set_ylabel("||w - w0|| / ||w0||")
    ax.set_title(title or "Drift from the pretrained weights", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path
