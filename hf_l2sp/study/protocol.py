"""What the transfer study runs: settings (source model -> target data), the schedule, the hyperparameter grids.

Every run goes through the same pieces `hf-l2sp train` uses (load_image_dataset, load_backbone, SPConfig,
SPTrainer); this module only names the choices. Three phases per setting:

1. `lr`: plain fine-tuning (`none`) at each learning rate of `Schedule.learning_rates`, on `selection_seeds`, at
   `selection_size` images per class. The best mean validation accuracy fixes the learning rate for every method.
2. `grid`: each regularizer at each point of its grid (same seeds and size); the best mean validation accuracy fixes
   its hyperparameters. Each selection seed draws its own training subset *and* its own validation carve, so the
   choice is made over repeated splits and its spread can be reported.
3. `final`: each regularizer with its chosen hyperparameters at every size and every seed of `seeds`; only these
   runs are evaluated on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..penalties import all_names
from ..penalties.spec import grid_parameter, search_space
from ..utils.errors import ConfigError



@dataclass(frozen=True)
class FisherPlan:
    """How the setting's Fisher diagonal is estimated (through `hf-l2sp fisher`)."""

    dataset: str  # images for the estimate; never the target test split
    mode: str = "sampled"
    num_samples: int = 256
    draws: int = 4


@dataclass(frozen=True)
class SourcePretraining:
    """A source network the study trains itself (near transfer): random init of `architecture`, then `dataset`,
    at the setting's image size."""

    architecture: str
    dataset: str
    epochs: int = 6
    learning_rate: float = 0.05


@dataclass(frozen=True)
class Setting:
    name: str
    transfer: str  # "far" or "near"
    model: str  # model_name_or_path, or filled in from `pretrain`
    dataset: str
    fisher: FisherPlan
    pretrain: SourcePretraining | None = None
    validation_fraction: float = 0.2
    image_size: int = 32
    description: str = ""


@dataclass(frozen=True)
class Schedule:
    """SGD with momentum, linear warm-up then cosine decay, no clipping; steps depend on the training-set size."""

    steps_per_size: dict[int, int] = field(default_factory=lambda: {5: 60, 20: 100, 100: 200})
    learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    batch_size: int = 16
    eval_batch_size: int = 256
    warmup_fraction: float = 0.1
    momentum: float = 0.9
    delta_warmup_steps: int = 30
    delta_attention_batches: int = 1  # DELTA ablates every channel once per batch: the costliest part of its setup

    def steps(self, size: int) -> int:
        if size in self.steps_per_size:
            return self.steps_per_size[size]
        known = sorted(self.steps_per_size)
        return self.steps_per_size[min(known, key=lambda k: abs(k - size))]


# Which regularizers the study runs, their grids and what each grid varies all come from the registry: a newly
# registered penalty joins the study with its own search space.
REGULARIZERS: tuple[str, ...] = tuple(all_names())
GRIDS: dict[str, tuple[float, ...]] = {name: search_space(name).grid or (0.0,) for name in REGULARIZERS}
GRID_PARAMETER: dict[str, str] = {name: grid_parameter(name) for name in REGULARIZERS}


def default_value(regularizer: str) -> float:
    """The grid's middle value: what `--quick` (no grid) uses."""
    grid = GRIDS[regularizer]
    return grid[len(grid) // 2]


@dataclass(frozen=True)
class StudyPlan:
    settings: tuple[Setting, ...]
    regularizers: tuple[str, ...] = REGULARIZERS
    sizes: tuple[int, ...] = (5, 20, 100)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    selection_seeds: tuple[int, ...] = (100, 101, 102)
    selection_size: int = 20
    schedule: Schedule = field(default_factory=Schedule)
    grid: bool = True  # False: no lr or hyperparameter search (middle values), for --quick

    def __post_init__(self):
        unknown = [r for r in self.regularizers if r not in GRIDS]
        if unknown:
            raise ConfigError(f"Unknown study regularizer(s) {unknown}; choices: {', '.join(REGULARIZERS)}.")
        if set(self.seeds) & set(self.selection_seeds):
            raise ConfigError("selection_seeds must differ from seeds: the final runs must not reuse the splits "
                              "the hyperparameters were chosen on.")


LITE0 = "hf_l2sp:efficientnet_lite0"


def default_settings() -> tuple[Setting, ...]:
    return (
        Setting("far_digits", "far", LITE0, "hf_l2sp:digits", FisherPlan("hf_l2sp:digits"),
                description="ImageNet EfficientNet-Lite0 -> scikit-learn 8x8 digits (10 classes)"),
        Setting("far_mnist", "far", LITE0, "hf_l2sp:mnist", FisherPlan("hf_l2sp:mnist"), validation_fraction=0.125,
                description="ImageNet EfficientNet-Lite0 -> MNIST sample (10 classes)"),
        Setting("near_mnist", "near", "", "hf_l2sp:mnist_5to9",
                FisherPlan("hf_l2sp:mnist_0to4", mode="exact", num_samples=1000, draws=1),
                pretrain=SourcePretraining("test_resnet", "hf_l2sp:mnist_0to4"), validation_fraction=0.15,
                description="small ResNet pretrained on MNIST digits 0-4 -> digits 5-9 (5 classes)"),
    )


def full_plan() -> StudyPlan:
    return StudyPlan(default_settings())


def quick_plan() -> StudyPlan:
    """One dataset, two sizes, two seeds, no grid: the machinery end to end in minutes."""
    far_digits = replace(default_settings()[0], fisher=FisherPlan("hf_l2sp:digits", num_samples=64, draws=2))
    return StudyPlan((far_digits,), sizes=(5, 20), seeds=(0, 1), grid=False)
