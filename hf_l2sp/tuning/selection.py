"""Choosing a value on validation accuracy over repeated splits, and how firm that choice is."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass


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

    def as_dict(self) -> dict:
        return asdict(self)


def choose(records: list[dict], field: str) -> Choice:
    """The `field` value with the best mean `val_accuracy` (ties: the smallest value). Never reads test results."""
    by_value: dict[float, dict[int, float]] = defaultdict(dict)
    for record in records:
        by_value[record[field]][record["seed"]] = record["val_accuracy"]
    if not by_value:
        raise ValueError(f"No selection runs to choose {field} from.")
    seeds = sorted(set.intersection(*(set(v) for v in by_value.values())))
    if not seeds:
        raise ValueError(f"The selection runs for {field} share no seed; cannot compare grid values.")
    means = {value: statistics.fmean(per_seed[s] for s in seeds) for value, per_seed in by_value.items()}
    ranked = sorted(means, key=lambda v: (-means[v], v))
    best = ranked[0]
    split_choices = tuple(min(by_value, key=lambda v: (-by_value[v][s], v)) for s in seeds)
    values = [by_value[best][s] for s in seeds]
    return Choice(
        value=best, mean_val=means[best], std_val=statistics.stdev(values) if len(values) > 1 else 0.0,
        runner_up=ranked[1] if len(ranked) > 1 else None,
        margin=means[best] - means[ranked[1]] if len(ranked) > 1 else None,
        split_choices=split_choices, agreement=sum(c == best for c in split_choices) / len(split_choices),
        grid=tuple(sorted(means.items())),
    )
