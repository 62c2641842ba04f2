"""Which retention sets a run measures, with which measure, and their values at the start of the run.

A retention set measures what the starting model knew. At every evaluation each set gives its metric at the
current weights and its change since the start, `forgetting` (positive: worse than the start):

| measure | for | metric | forgetting |
| --- | --- | --- | --- |
| `loss` | causal and masked LMs (and any model, asked for) | the model's own loss on the set | loss - start loss |
| `agreement` | classifiers whose checkpoint has a source head | share of examples whose source-head prediction through the current backbone is the start's | 1 - agreement |
| `source_accuracy` | the same, on a set with source labels | accuracy of the source head through the current backbone | start accuracy - accuracy |
| `cka` | any classifier | linear CKA between the start's and the current features (the head's input) | 1 - CKA |

`auto` picks `loss` for language models and models without a head, `agreement` where the checkpoint holds a
source head, else `cka`. The start values are measured once, before the first step, and kept in every checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..utils.errors import ConfigError
from .measures import linear_cka

logger = logging.getLogger(__name__)

MEASURES = ("auto", "loss", "agreement", "source_accuracy", "cka")
#: Tasks whose retention is the model's own loss on the set (perplexity for causal LMs).
LANGUAGE_MODEL_TASKS = ("text-generation", "fill-mask", "text2text-generation")
START_FILE = "retention_start.safetensors"
SOURCE_HEAD_MEASURES = ("agreement", "source_accuracy")


def parse_names(value: str | None, option: str) -> list[str]:
    """'a, b' -> ['a', 'b']; refuses empty names and repeats."""
    if value is None:
        return []
    names = [v.strip() for v in str(value).split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"{option} must be comma-separated, distinct eval_dataset keys; got {value!r}.")
    return names


def resolve_measure(asked: str, language_model: bool, has_head: bool, source_head: bool, why_no_source: str) -> str:
    """The measure a set gets, or a ConfigError when the asked one cannot be computed on this model."""
    if asked == "auto":
        if language_model or not has_head:
            return "loss"
        return "agreement" if source_head else "cka"
    if asked in SOURCE_HEAD_MEASURES and not source_head:
        raise ConfigError(f"sp_retention_measure={asked!r} needs the source model's head, and {why_no_source}. "
                          "Use 'cka' (label-free, no source head) or 'loss', or give sp_reference a checkpoint that "
                          "holds the source head.")
    if asked == "cka" and not has_head:
        raise ConfigError("sp_retention_measure='cka' compares the features that enter the task head, and this "
                          "model has none (a language model, or sp_head='none'); use 'loss'.")
    return asked


@dataclass
class RetentionPlan:
    """The retention sets of a run (name -> measure), where their features are read, and their start values."""

    measures: dict[str, str]
    #: Sets given apart from Trainer's eval_dataset (`retention_datasets=`): evaluated beside it.
    apart: dict[str, object] = field(default_factory=dict)
    kl_set: str | None = None
    head_name: str | None = None  # the module whose input is the features (classifier measures)
    source_head: nn.Module | None = None
    source_note: str = ""
    start: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def set_for(self, metric_key_prefix: str) -> str | None:
        """The retention set Trainer is evaluating under `metric_key_prefix` ('eval_<name>'), if any."""
        for name in self.measures:
            if metric_key_prefix == f"eval_{name}":
                return name
        return None

    def describe(self) -> str:
        sets = ", ".join(f"{name} ({measure})" for name, measure in self.measures.items())
        source = f"; source head: {self.source_note}" if self.source_note else ""
        kl = f"; KL to the start on {self.kl_set}" if self.kl_set else ""
        return f"hf_l2sp: retention sets {sets or '-'}{source}{kl}"

    def record(self, name: str, current: dict[str, Tensor | float]) -> dict[str, float]:
        """Metrics of set `name` at the current weights against its start (taken from `current` the first time):
        what is logged as eval_<name>_<metric>, `forgetting` included."""
        measure = self.measures[name]
        if name not in self.start:
            self.start[name] = {k: (v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64))
                                for k, v in current.items()}
        start = self.start[name]
        if measure == "loss":
            loss = float(current["loss"])
            return {"forgetting": loss - float(start["loss"])}
        out = {"cka": linear_cka(start["features"], current["features"])}
        if "predictions" in current:
            out["agreement"] = float((current["predictions"] == start["predictions"]).double().mean())
        if measure == "source_accuracy":
            out["source_accuracy"] = float(current["accuracy"])
            out["forgetting"] = float(start["accuracy"]) - float(current["accuracy"])
        elif measure == "agreement":
            out["forgetting"] = 1.0 - out["agreement"]
        else:
            out["forgetting"] = 1.0 - out["cka"]
        return out

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def save_start(self, folder: str | Path) -> None:
        tensors = {f"{name}/{key}": value.detach().cpu().contiguous()
                   for name, values in self.start.items() for key, value in values.items()}
        if tensors:
            save_file(tensors, str(Path(folder) / START_FILE))

    def load_start(self, folder: str | Path) -> None:
        """The start values a checkpoint kept; refuses a checkpoint without them for any of this run's sets."""
        path = Path(folder) / START_FILE
        stored: dict[str, dict[str, Tensor]] = {}
        if path.is_file():
            for key, value in load_file(str(path)).items():
                name, _, metric = key.rpartition("/")
                stored.setdefault(name, {})[metric] = value
        missing = [name for name in self.measures if name not in stored]
        if missing:
            raise ConfigError(f"Checkpoint {str(folder)!r} holds no start values for retention set(s) "
                              f"{', '.join(missing)} ({START_FILE}): it was saved by a run that did not measure them, "
                              "so their forgetting cannot be measured against that run's start. Resume without "
                              "those sp_retention sets, or train from the start.")
        self.start = {name: stored[name] for name in self.measures}
