"""What every penalty declares, weight or feature penalty alike: the registry reads it, and so do SPConfig's
validation, the model card, `hf-l2sp search` and the transfer study. Adding a penalty means declaring these here,
in its own module, and nowhere else."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..utils.errors import ConfigError

PAPER_CITATION = """@inproceedings{li2018explicit,
  title     = {Explicit Inductive Bias for Transfer Learning with Convolutional Networks},
  author    = {Li, Xuhong and Grandvalet, Yves and Davoine, Franck},
  booktitle = {Proceedings of the 35th International Conference on Machine Learning (ICML)},
  pages     = {2825--2834},
  year      = {2018},
  eprint    = {1802.01483},
  archivePrefix = {arXiv}
}"""


def check_coefficient(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}.")
    return value


class Penalty:
    """Class-level facts of a penalty. `name` is set by the registry's decorator."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "weight" or "feature", set by the base classes
    #: Heading on the model card, with the paper that introduced it.
    title: ClassVar[str] = ""
    #: Plain-text formula, for logs, `hf-l2sp regularizers` and model cards.
    formula: ClassVar[str] = ""
    citation: ClassVar[str] = PAPER_CITATION
    #: SPConfig fields it reads that must be finite and >= 0 (checked on every SPConfig, used or not).
    coefficient_fields: ClassVar[tuple[str, ...]] = ()
    #: Its search space: the SPConfig fields one searched value sets, and the default grid (ascending; ties in a
    #: search go to the first).
    search_fields: ClassVar[tuple[str, ...]] = ()
    search_grid: ClassVar[tuple[float, ...]] = ()
    #: Fields the transfer study holds at the paper's values while it searches `search_fields` (e.g. beta = 0.01).
    protocol_fixed: ClassVar[dict[str, float]] = {}
    #: Position in listings (`hf-l2sp regularizers`, the study's tables): the paper's order, then the follow-ups.
    listing_order: ClassVar[int] = 1000

    @classmethod
    def check_config(cls, args: Any, selected: bool) -> None:
        """Rules on SPConfig beyond the coefficients; `selected` says whether `args.regularizer` names it.
        Raise ValueError naming the bad value and what would be valid."""

    @classmethod
    def from_config(cls, args: Any) -> Penalty:
        raise NotImplementedError
