"""SPConfig: TrainingArguments plus the regularizer's settings."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .optimizer_side import SP_MODES
from .parameters import INCLUDE_CHOICES
from .regularizer_spec import parse_regularizer
from .regularizers import Regularizer, get_regularizer_class
from .regularizers.base import check_coefficient


@dataclass
class SPConfig(TrainingArguments):
    """`TrainingArguments` for `SPTrainer`: every Trainer option, plus the explicit inductive bias.

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

    NOTE: defaults that differ from `TrainingArguments`: `remove_unused_columns=False` (image datasets keep their
    raw columns for the lazy transform).
    """

    regularizer: str = field(
        default="l2_sp",
        metadata={"help": "none, l2, l2_sp, l1_sp, group_lasso_sp, l2_sp_fisher, delta, bss, or a weight and feature "
                          "penalty joined by '+' (e.g. l2_sp+bss)."},
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
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Drop dataset columns the model's forward does not take (False: keep them for transforms)."},
    )

    def __post_init__(self):
        self._validate_sp()
        super().__post_init__()

    def _validate_sp(self) -> None:
        spec = parse_regularizer(self.regularizer)  # raises with the valid names
        regularizer_cls = get_regularizer_class(spec.weight)
        check_coefficient("sp_delta_alpha", self.sp_delta_alpha)
        check_coefficient("sp_bss_eta", self.sp_bss_eta)
        if self.sp_bss_k < 1:
            raise ValueError(f"sp_bss_k must be >= 1; got {self.sp_bss_k}.")
        self.sp_alpha = check_coefficient("sp_alpha", self.sp_alpha)
        self.sp_beta = check_coefficient("sp_beta", self.sp_beta)
        if self.sp_include not in INCLUDE_CHOICES:
            raise ValueError(f"sp_include must be one of {', '.join(INCLUDE_CHOICES)}; got {self.sp_include!r}.")
        if self.sp_mode not in SP_MODES:
            raise ValueError(f"sp_mode must be one of {', '.join(SP_MODES)}; got {self.sp_mode!r}.")
        if self.sp_mode != "loss" and regularizer_cls.quadratic_form is Regularizer.quadratic_form:
            raise ValueError(f"sp_mode={self.sp_mode!r} needs a quadratic regularizer (l2, l2_sp, l2_sp_fisher); "
                             f"{self.regularizer!r} has no closed-form gradient step. Use sp_mode='loss'.")
        if spec.features and self.sp_mode != "loss":
            raise ValueError(f"Feature penalties ({', '.join(spec.features)}) act through the loss; they need "
                             f"sp_mode='loss', not {self.sp_mode!r}.")
        if spec.weight == "l2_sp_fisher" and not self.sp_fisher:
            raise ValueError("regularizer='l2_sp_fisher' needs sp_fisher: a Fisher-diagonal file, folder or Hub repo "
                             "(estimate one with `hf-l2sp fisher`).")
        if self.sp_fisher and spec.weight != "l2_sp_fisher":
            raise ValueError(f"sp_fisher is only used by regularizer='l2_sp_fisher', not {self.regularizer!r}; "
                             "remove sp_fisher or switch the regularizer.")
        if self.weight_decay > 0 and regularizer_cls.pulls_to_source:
            warnings.warn(
                f"weight_decay={self.weight_decay} together with regularizer={self.regularizer!r}: the optimizer "
                "shrinks weights toward 0 while the penalty pulls them toward their pretrained values w0, so the "
                "backbone is shrunk twice and ends between the two. The paper uses no weight decay with *_sp "
                "penalties; set weight_decay=0 (sp_beta already covers the new head).",
                UserWarning,
                stacklevel=3,
            )


__all__ = ["SPConfig"]
