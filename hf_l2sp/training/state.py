"""Everything SPTrainer holds about the penalty, in one place.

`PenaltyState` is what the trainer knows between steps: the regularizers built from the config, the anchor w0 and
which tensors are new, the parameter sets resolved on the live model, the optimizer hook of `sp_mode` 'grad' /
'decoupled', the log, and whether the trainer corrects Trainer's loss normalisation for this model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..anchor.adapters import AdapterPlan
from ..anchor.parameters import SPParameters
from ..anchor.reference import Reference
from ..loading.new_tensors import NewTensors
from ..penalties import FEATURE_REGULARIZERS, Regularizer, get_regularizer_class
from ..penalties.feature import FeatureRegularizer
from ..penalties.l2 import L2
from ..penalties.none import NoRegularizer
from ..penalties.spec import RegularizerSpec, parse_regularizer
from .optimizer_side import OptimizerSidePenalty
from .penalty_log import PenaltyLog
from .zero3 import PartitionedPenalty


@dataclass
class OptimizerHook:
    """sp_mode 'grad' / 'decoupled': the torch optimizer (inside accelerate's wrapper), what it applies, the hook."""

    optimizer: object
    side: OptimizerSidePenalty
    handle: object

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class PenaltyState:
    spec: RegularizerSpec
    regularizer: Regularizer
    features: list[FeatureRegularizer]
    log: PenaltyLog
    reference: Reference | None = None
    new_tensors: NewTensors | None = None
    head_modules: list[str] = field(default_factory=list)  # the task head's modules (sp_head or detected)
    adapters: AdapterPlan | None = None  # a PEFT model's LoRA terms and modules_to_save anchors
    parameters: SPParameters | None = None
    parameters_key: tuple[int, ...] | None = None  # ids of the model's parameters the sets were resolved on
    optimizer_hook: OptimizerHook | None = None
    #: True when the model's loss is a per-micro-batch mean although Trainer would count on num_items_in_batch.
    corrects_loss_normalisation: bool = False
    #: sp_mode 'grad'/'decoupled': sum over the run's optimizer steps of Omega (for the final train_loss).
    side_penalty_total: float = 0.0
    side_penalty_steps: int = 0
    #: Where Omega acts (`zero3.penalty_route`): 'loss', 'optimizer' (sp_mode grad/decoupled) or 'partitions'
    #: (DeepSpeed ZeRO-3); and the penalty on ZeRO-3's partitions once training started.
    where: str = "loss"
    partitioned: PartitionedPenalty | None = None

    @property
    def zero3(self) -> bool:
        return self.where == "partitions"
    ready: bool = field(default=False)  # set once Trainer.__init__ has finished (model_init may call back earlier)

    def measure_outside_loss(self, step: int) -> None:
        """Omega at the current weights into the log, nothing changed and no step counted: a log's own pass where
        Omega acts outside the loss and the window's steps did not measure it."""
        if self.partitioned is not None:
            self.log.add_weight_terms(self.partitioned.measure(), step)
        elif self.optimizer_hook is not None:
            self.log.add_weight_terms(self.optimizer_hook.side.measure_now(self.optimizer_hook.optimizer), step)

    @classmethod
    def from_config(cls, args, regularizer: Regularizer | None = None) -> PenaltyState:
        """The penalties `args` (SPArguments) name; `regularizer` replaces the weight penalty when given."""
        spec = parse_regularizer(args.regularizer)
        features = [FEATURE_REGULARIZERS[name].from_config(args) for name in spec.features]
        return cls(spec=spec, regularizer=regularizer or build_weight_regularizer(spec, args), features=features,
                   log=PenaltyLog([f.name for f in features]))

    def rebuilt(self, args, regularizer: Regularizer | None = None) -> PenaltyState:
        """New penalties from `args` (a search trial's sp_* values) on the same anchor, adapters and model."""
        new = PenaltyState.from_config(args, regularizer)
        new.reference, new.new_tensors, new.adapters, new.ready = self.reference, self.new_tensors, self.adapters, \
            self.ready
        new.head_modules = self.head_modules
        new.corrects_loss_normalisation = self.corrects_loss_normalisation
        new.where = self.where
        self.detach_optimizer_hook()
        if self.partitioned is not None:
            self.partitioned.detach()
        return new

    @property
    def active(self) -> bool:
        """False under 'none' or when every coefficient is 0: training is then Trainer's, and nothing about the
        model (its head, what is anchored) can refuse it."""
        return self.regularizer.active or any(f.active for f in self.features)

    @property
    def weights_sharded(self) -> bool:
        """FSDP2: the parameter sets hold shards, so the logged weight terms are partial sums."""
        return self.partitioned is not None or (self.parameters is not None and self.parameters.sharded)

    def parameters_are_for(self, model: nn.Module) -> bool:
        return self.parameters is not None and self.parameters_key == tuple(id(p) for p in model.parameters())

    def detach_optimizer_hook(self) -> None:
        if self.optimizer_hook is not None:
            self.optimizer_hook.remove()
            self.optimizer_hook = None


def build_weight_regularizer(spec: RegularizerSpec, args) -> Regularizer:
    """The weight part of `args.regularizer`; feature penalties alone imply DELTA's head L2 (or nothing, for BSS)."""
    if spec.weight_named:
        return get_regularizer_class(spec.weight).from_config(args)
    return L2(alpha=0.0, beta=args.sp_beta) if spec.weight == "l2" else NoRegularizer()
