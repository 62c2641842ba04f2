"""SPArguments, the regularizer's settings as a dataclass to mix into any trainer config, and SPConfig:
`TrainingArguments` plus those settings."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..anchor.parameters import INCLUDE_CHOICES
from ..forgetting.plan import MEASURES, parse_names
from ..penalties import REGULARIZERS, all_names, registered
from ..penalties.base import check_coefficient
from ..penalties.spec import parse_regularizer
from .deepspeed_setup import check_deepspeed_launch
from .optimizer_side import SP_MODES
from ..utils.errors import ConfigError
from ..utils.secrets import credential_fields


@dataclass
class SPArguments:
    """The explicit inductive bias's settings, to put in front of any `TrainingArguments` subclass:
    `SPConfig` is `SPArguments` over `TrainingArguments`; for TRL, `@dataclass class SFTSPConfig(SPArguments,
    SFTConfig)`. Its `__post_init__` validates them, then runs the config's own.

    Parameters that control the regularizer:

        regularizer (`str`, defaults to `"l2_sp"`):
            A weight penalty (none, l2, l2_sp, l1_sp, group_lasso_sp, l2_sp_fisher), a feature penalty (delta, bss),
            or one of each joined by '+', e.g. `l2_sp+bss`. Each part keeps its own coefficient.
        sp_alpha (`float`, defaults to `0.1`):
            alpha, the strength on the pretrained parameters S (the paper's Stanford Dogs value).
        sp_beta (`float`, defaults to `0.01`):
            beta, the L2 strength on the new parameters (the re-initialised head), as in the paper.
        sp_include (`str`, defaults to `"weights"`):
            `weights`: conv and linear weight tensors only (BatchNorm affine parameters and biases are free, as in
            the paper's code); `all`: every trainable tensor (as tllib and the DELTA code do).
        sp_reference (`str`, *optional*):
            Checkpoint folder, weights file or Hub id to read w0 from. Default: snapshot the model's weights when
            `SPTrainer` is built.
        sp_reference_revision (`str`, *optional*):
            Hub revision of `sp_reference`.
        sp_fisher (`str`, *optional*):
            Fisher-diagonal safetensors file (or folder / Hub repo holding `fisher.safetensors`) for `l2_sp_fisher`.
        sp_head (`str`, *optional*):
            Comma-separated module names of the new head; `none` for no head. Default: detected from the model.
        sp_delta_alpha (`float`, defaults to `0.01`):
            DELTA's coefficient on the feature-map distance, summed over the optimizer step's global batch (official
            default, for the official code's batch sum on one device).
        sp_delta_layers (`str`, *optional*):
            Comma-separated modules whose outputs DELTA compares. Default: each backbone stage (timm feature_info,
            or a transformers CNN's encoder.stages).
        sp_delta_attention (`str`, defaults to `"computed"`):
            `computed` (channel attention by ablation after a head-only warm-up), `uniform`, or a saved
            `delta_attention.safetensors` (file or folder) to reuse.
        sp_delta_attention_batches (`int`, defaults to `4`):
            Training batches used to measure each channel's importance.
        sp_delta_warmup_steps (`int`, defaults to `50`):
            Head-only SGD steps before measuring channel importance.
        sp_bss_eta (`float`, defaults to `0.001`):
            BSS's eta (official default).
        sp_bss_k (`int`, defaults to `1`):
            Number of smallest singular values BSS shrinks.
        sp_mode (`str`, defaults to `"loss"`):
            `loss`: Omega is added to the training loss (the paper). `grad`: its closed-form gradient is added to
            `.grad` once per optimizer step, before gradient clipping (same result as `loss`, no graph).
            `decoupled`: w <- w - lr*alpha*(w - w0) in the optimizer step, like AdamW's decoupled decay: it acts
            outside gradient clipping (a different method with Adam; equal to `loss` only for plain SGD without
            momentum or clipping). `grad` and `decoupled` need a quadratic regularizer: l2, l2_sp or l2_sp_fisher.

        sp_retention (`str`, *optional*):
            Comma-separated keys of a dict `eval_dataset` whose sets measure what the starting model knew. At every
            evaluation each gets `eval_<name>_forgetting`, its metric's change since the start (measured once before
            the first step; positive is worse), beside Trainer's own metrics. Sets can also be given apart from
            `eval_dataset` with the trainer's `retention_datasets=`.
        sp_retention_measure (`str`, defaults to `"auto"`):
            `loss` (the model's own loss: causal and masked LMs), `agreement` (how often the source head's prediction
            through the current backbone is the start's), `source_accuracy` (its accuracy on the set's source labels),
            `cka` (linear CKA between the start's and the current features entering the head) or `auto` (loss for
            language models, agreement where the checkpoint holds a source head, else cka).
        sp_retention_kl (`str`, *optional*):
            A key of `eval_dataset` holding held-out target text: causal LMs log `eval_<name>_kl`, the mean per-token
            KL(p_start ‖ p) of the starting model's next-token distribution to the current one, computed from the
            anchor the run holds (no second model; LoRA: the adapters disabled).
        sp_checkpoint_artefacts (`bool`, defaults to `False`):
            Also write the run's artefacts (drift, model card, `sp_config.json`) into every checkpoint. By default
            they are written once, by the final `save_model()` and by `push_to_hub`; checkpoints always hold the
            weights, the anchor w0, the feature penalties' state and a completion marker.

    `remove_unused_columns` keeps Trainer's meaning; SPTrainer keeps every column of a dataset that has a transform
    (`with_transform` / `set_transform`, as `with_transforms` builds), since the transform reads them.
    """

    regularizer: str = field(
        default="l2_sp",
        metadata={"help": f"{', '.join(all_names())}, or a weight and a feature penalty joined by '+' "
                          "(e.g. l2_sp+bss)."},
    )
    sp_alpha: float = field(default=0.1, metadata={"help": "alpha: strength of the penalty on pretrained parameters."})
    sp_beta: float = field(default=0.01, metadata={"help": "beta: L2 strength on the new head parameters."})
    sp_include: str = field(
        default="weights",
        metadata={"help": "Penalised tensors: 'weights' (conv/linear weights, the paper) or 'all' (every tensor)."},
    )
    sp_reference: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder, file or Hub id holding w0. Default: snapshot of the model at start."},
    )
    sp_reference_revision: str | None = field(default=None, metadata={"help": "Hub revision of sp_reference."})
    sp_fisher: str | None = field(
        default=None, metadata={"help": "Fisher diagonal file, folder or Hub repo (for l2_sp_fisher)."}
    )
    sp_head: str | None = field(
        default=None,
        metadata={"help": "Comma-separated head module names, or 'none'. Default: detected from the model."},
    )
    sp_delta_alpha: float = field(default=0.01, metadata={"help": "DELTA's coefficient (feature-map distance)."})
    sp_delta_layers: str | None = field(
        default=None, metadata={"help": "Modules DELTA compares, comma separated. Default: the backbone stages."}
    )
    sp_delta_attention: str = field(
        default="computed", metadata={"help": "DELTA channel weights: 'computed', 'uniform' or a saved file."}
    )
    sp_delta_attention_batches: int = field(default=4, metadata={"help": "Batches for DELTA's channel importance."})
    sp_delta_warmup_steps: int = field(default=50, metadata={"help": "Head-only steps before DELTA's attention."})
    sp_bss_eta: float = field(default=0.001, metadata={"help": "BSS's eta."})
    sp_bss_k: int = field(default=1, metadata={"help": "How many smallest singular values BSS shrinks."})
    sp_mode: str = field(
        default="loss",
        metadata={"help": "'loss' (penalty in the loss, the paper), 'grad' (closed-form gradient added once per "
                          "step, before clipping) or 'decoupled' (w <- w - lr*alpha*(w - w0) in the optimizer step, "
                          "outside clipping)."},
    )
    sp_retention: str | None = field(
        default=None,
        metadata={"help": "Comma-separated eval_dataset keys that measure retained knowledge: each logs "
                          "eval_<name>_forgetting (its change since the start; positive is worse)."},
    )
    sp_retention_measure: str = field(
        default="auto",
        metadata={"help": "How retention sets are measured: auto, loss, agreement, source_accuracy or cka."},
    )
    sp_retention_kl: str | None = field(
        default=None,
        metadata={"help": "eval_dataset key of held-out target text: log the per-token KL from the starting model "
                          "(causal LMs)."},
    )
    sp_checkpoint_artefacts: bool = field(
        default=False,
        metadata={"help": "Also write drift, model card and sp_config.json into every checkpoint (default: only the "
                          "final save and the push; checkpoints always keep the anchor and what resuming needs)."},
    )
    def __getstate__(self):
        """Pickled (Trainer's training_args.bin, in the output folder and every checkpoint) with its credential
        fields (hub_token, ...) blanked; the live arguments, and their copies, keep them."""
        state = dict(self.__dict__)
        for name in credential_fields(self):
            state[name] = None
        return state

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def __post_init__(self):
        self._validate_sp()
        parent = super()
        if hasattr(parent, "__post_init__"):
            try:
                parent.__post_init__()
            except ValueError as err:  # the config's own checks (precision, device, strategies): a user's error
                if isinstance(err, ConfigError):
                    raise
                raise ConfigError(" ".join(str(err).split())) from err

    def _validate_sp(self) -> None:
        check_deepspeed_launch(self)
        spec = parse_regularizer(self.regularizer)  # raises with the valid names
        for penalty in registered():  # each penalty's own fields and rules, whether it runs or not
            for name in penalty.coefficient_fields:
                setattr(self, name, check_coefficient(name, getattr(self, name)))
            penalty.check_config(self, selected=penalty.name in spec.names)
        if self.sp_include not in INCLUDE_CHOICES:
            raise ConfigError(f"sp_include must be one of {', '.join(INCLUDE_CHOICES)}; got {self.sp_include!r}.")
        if self.sp_retention_measure not in MEASURES:
            raise ConfigError(f"sp_retention_measure must be one of {', '.join(MEASURES)}; got "
                              f"{self.sp_retention_measure!r}.")
        parse_names(self.sp_retention, "sp_retention")
        if self.sp_mode not in SP_MODES:
            raise ConfigError(f"sp_mode must be one of {', '.join(SP_MODES)}; got {self.sp_mode!r}.")
        weight = REGULARIZERS[spec.weight]
        if self.sp_mode != "loss" and not weight.supports_optimizer_side:
            closed_form = ", ".join(n for n, c in REGULARIZERS.items() if c.supports_optimizer_side)
            raise ConfigError(f"sp_mode={self.sp_mode!r} needs a quadratic regularizer ({closed_form}); "
                              f"{self.regularizer!r} has no closed-form gradient step. Use sp_mode='loss'.")
        if spec.features and self.sp_mode != "loss":
            raise ConfigError(f"Feature penalties ({', '.join(spec.features)}) act through the loss; they need "
                              f"sp_mode='loss', not {self.sp_mode!r}.")
        if getattr(self, "weight_decay", 0) > 0 and weight.pulls_to_source:
            warnings.warn(
                f"weight_decay={self.weight_decay} together with regularizer={self.regularizer!r}: the optimizer "
                "shrinks weights toward 0 while the penalty pulls them toward their pretrained values w0, so the "
                "backbone is shrunk twice and ends between the two. The paper uses no weight decay with *_sp "
                "penalties; set weight_decay=0 (sp_beta already covers the new head).",
                UserWarning,
                stacklevel=3,
            )


@dataclass
class SPConfig(SPArguments, TrainingArguments):
    """`TrainingArguments` for `SPTrainer`: every Trainer option, plus the explicit inductive bias (`SPArguments`:
    regularizer, sp_alpha, sp_beta, sp_include, sp_reference, sp_head, sp_mode, ...)."""


SPConfig.__doc__ += "\n\n    " + SPArguments.__doc__.split("\n\n", 1)[1].lstrip()  # the fields, documented once


__all__ = ["SPArguments", "SPConfig"]
