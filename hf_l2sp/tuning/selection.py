"""Choosing a value on validation accuracy over repeated splits, and how firm that choice is."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

from ..utils.errors import ConfigError


@dataclass(frozen=True)
class Choice:
    value: float  # the chosen grid value (a learning rate or a regularizer coefficient)
    mean_val: float  # its validation accuracy, mean over the selection splits
    std_val: float  # ... and standard deviation over them
    runner_up: float | None  # the next best value
    margin: float | None  # mean_val(best) - mean_val(runner-up)
    split_choices: tuple[float, ...]  # the value each selection split alone would have picked
    agreement: float  # share of splits that alone pick `value`
    grid: tuple[tuple[float, float], ...]  # (value, mean val accuracy) for the whole grid
    decided_by: str = "validation accuracy"  # or "validation loss" / "smallest value" when accuracies tie
    val_images: int | None = None  # size of the validation split the accuracies were measured on
    #: Half-width of a 95 % binomial (Wilson) interval on the best value's accuracy at that size: differences
    #: smaller than this are not resolved by the split.
    interval_half_width: float | None = None

    @property
    def resolved(self) -> bool | None:
        """Whether the margin over the runner-up is larger than the validation split's own resolution."""
        if self.margin is None or self.interval_half_width is None:
            return None
        return self.margin > self.interval_half_width

    def as_dict(self) -> dict:
        return asdict(self)


def wilson_half_width(accuracy: float, n: int, z: float = 1.96) -> float:
    """Half-width of the Wilson score interval for a proportion `accuracy` measured on `n` examples."""
    return z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def choose(records: list[dict], field: str) -> Choice:
    """The `field` value with the best mean `val_accuracy`; ties go to the lower mean `val_loss` (when recorded),
    then to the smallest value. Never reads test results."""
    by_value: dict[float, dict[int, float]] = defaultdict(dict)
    for record in records:
        by_value[record[field]][record["seed"]] = record["val_accuracy"]
    if not by_value:
        raise ConfigError(f"No selection runs to choose {field} from.")
    seeds = sorted(set.intersection(*(set(v) for v in by_value.values())))
    if not seeds:
        raise ConfigError(f"The selection runs for {field} share no seed; cannot compare grid values.")
    means = {value: statistics.fmean(per_seed[s] for s in seeds) for value, per_seed in by_value.items()}
    losses = _mean_losses(records, field, seeds)
    ranked = sorted(means, key=lambda v: (-means[v], losses.get(v, math.inf), v))
    best = ranked[0]
    decided_by = "validation accuracy"
    if len(ranked) > 1 and means[ranked[1]] == means[best]:
        decided_by = "validation loss" if losses.get(ranked[1], math.inf) != losses.get(best, math.inf) \
            else "smallest value"
    split_choices = tuple(min(by_value, key=lambda v: (-by_value[v][s], v)) for s in seeds)
    sizes = [r["val_images"] for r in records if r.get("val_images")]
    val_images = min(sizes) if sizes else None
    values = [by_value[best][s] for s in seeds]
    return Choice(
        value=best, mean_val=means[best], std_val=statistics.stdev(values) if len(values) > 1 else 0.0,
        runner_up=ranked[1] if len(ranked) > 1 else None,
        margin=means[best] - means[ranked[1]] if len(ranked) > 1 else None,
        split_choices=split_choices, agreement=sum(c == best for c in split_choices) / len(split_choices),
        grid=tuple(sorted(means.items())), decided_by=decided_by, val_images=val_images,
        interval_half_width=wilson_half_width(means[best], val_images) if val_images else None,
    )


def _mean_losses(records: list[dict], field: str, seeds: list) -> dict:
    by_value: dict = defaultdict(dict)
    for record in records:
        if record.get("val_loss") is not None:
            by_value[record[field]][record["seed"]] = record["val_loss"]
    return {value: statistics.fmean(per_seed[s] for s in seeds) for value, per_seed in by_value.items()
            if all(s in per_seed for s in seeds)}


def resolution_note(choice: dict, what: str) -> str | None:
    """A sentence for reports when the validation split is too small to resolve the choice, else None."""
    margin, half = choice.get("margin"), choice.get("interval_half_width")
    if margin is None or half is None or margin > half:
        return None
    return (f"{what}: the validation split has {choice['val_images']} images; a 95 % binomial interval on its "
            f"accuracy is ±{100 * half:.1f} points, wider than the selection margin ({100 * margin:.1f} points), "
            f"so the split cannot resolve the grid's differences (choice decided by {choice['decided_by']}). "
            "Use a larger validation split (more images per class) or more search seeds.")
