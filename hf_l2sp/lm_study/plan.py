"""What the language-model study runs: a healing phase, then each method on each seed, all at one token budget.

Methods are what a user can do instead of L2-SP to keep what the model knew: a lower learning rate (the `plain`
grid), L2 towards zero, LoRA, weight averaging between w0 and a plain run's end point (WiSE-FT, free: evaluated at
several mixing weights) and replay of general text, beside L2-SP itself and L2-SP on LoRA adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..utils.errors import ConfigError

FAMILIES = ("plain", "l2_sp", "l2", "lora", "lora_l2_sp", "replay", "wise")


@dataclass(frozen=True)
class Method:
    """One training run's recipe (seed apart)."""

    family: str
    learning_rate: float
    regularizer: str = "none"
    alpha: float = 0.0
    lora_rank: int = 0
    replay: float = 0.0  # fraction of the training sequences drawn from general text
    wise: tuple[float, ...] = ()  # mixing weights evaluated on this run's end point: w0 + m (w - w0)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"Unknown method family {self.family!r}; choices: {', '.join(FAMILIES)}.")

    @property
    def name(self) -> str:
        parts = [self.family, f"lr{self.learning_rate:g}"]
        if self.regularizer != "none":
            parts.append(f"a{self.alpha:g}")
        if self.lora_rank:
            parts.append(f"r{self.lora_rank}")
        if self.replay:
            parts.append(f"replay{self.replay:g}")
        return "-".join(parts)


@dataclass(frozen=True)
class Budget:
    """Tokens seen by every run, and how the healing and the measurements are sized."""

    steps: int = 16
    batch_size: int = 2
    block: int = 256  # tokens per training and evaluation sequence
    heal_steps: int = 120  # general-text loss moved 0.001-0.004 between steps 80 and 120: healed
    heal_learning_rate: float = 1e-4
    eval_blocks: int = 12  # per retention set and for the target
    kl_blocks: int = 6  # target blocks the KL to w0 is measured on


@dataclass(frozen=True)
class LMStudyPlan:
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    budget: Budget = field(default_factory=Budget)

    def only(self, families: list[str] | None) -> "LMStudyPlan":
        if not families:
            return self
        unknown = sorted(set(families) - {m.family for m in self.methods})
        if unknown:
            raise ConfigError(f"Unknown method(s) {unknown}; this plan has {sorted({m.family for m in self.methods})}.")
        return replace(self, methods=tuple(m for m in self.methods if m.family in families))


HIGH_LR = 3e-4
LORA_LR = 1e-3
WISE_MIXES = (0.25, 0.5, 0.75)


def full_plan() -> LMStudyPlan:
    methods = (
        Method("plain", 3e-5),
        Method("plain", 1e-4),
        Method("plain", 2e-4),
        Method("plain", HIGH_LR, wise=WISE_MIXES),
        Method("l2_sp", 1e-4, "l2_sp", 1.0),
        Method("l2_sp", HIGH_LR, "l2_sp", 0.1),
        Method("l2_sp", HIGH_LR, "l2_sp", 1.0),
        Method("l2", HIGH_LR, "l2", 0.1),
        Method("lora", LORA_LR, lora_rank=16),
        Method("lora_l2_sp", LORA_LR, "l2_sp", 1.0, lora_rank=16),
        Method("replay", 1e-4, replay=0.01),
        Method("replay", 1e-4, replay=0.1),
        Method("replay", HIGH_LR, replay=0.01),
        Method("replay", HIGH_LR, replay=0.1),
    )
    return LMStudyPlan(methods=methods, seeds=(0, 1, 2))


def quick_plan() -> LMStudyPlan:
    """Seed 0 of three of the full plan's runs: its rows repeat the committed full study's rows for seed 0."""
    keep = {"plain-lr0.0003", "plain-lr0.0001", "l2_sp-lr0.0003-a1"}
    full = full_plan()
    return replace(full, methods=tuple(m for m in full.methods if m.name in keep), seeds=(0,))
