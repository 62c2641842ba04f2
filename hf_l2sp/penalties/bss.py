from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..loading.model_parts import find_head_modules, unwrap_model
from .feature import FeatureContext, FeatureRegularizer
from .registry import register_feature_regularizer
from ..utils.errors import ConfigError

BSS_CITATION = """@inproceedings{chen2019catastrophic,
  title     = {Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning},
  author    = {Chen, Xinyang and Wang, Sinan and Fu, Bo and Long, Mingsheng and Wang, Jianmin},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2019}
}"""


@register_feature_regularizer("bss")
class BatchSpectralShrinkage(FeatureRegularizer):
    """BSS (Chen et al., NeurIPS 2019): shrink the smallest singular values of the batch's features.

    Omega(w) = eta * sum_{i=1..k} sigma_{-i}^2

    sigma_{-1} <= sigma_{-2} <= ... are the k smallest singular values of F (batch x d), the pooled pre-logits
    features, i.e. the input of the classification head, computed in float64 from the Gram matrix.

    The spectrum is a property of one batch, so it is computed per micro-batch on each process, as the official code
    computes it per batch; with gradient accumulation or several processes the step's penalty is the mean over its
    micro-batches (it enters each optimizer step once). Unlike the sums (task loss, DELTA), it therefore depends on
    how the global batch is split: k smallest singular values of 2 halves are not those of the whole.
    """

    title = "Batch Spectral Shrinkage (Chen et al., NeurIPS 2019)"
    listing_order = 70
    coefficient_fields = ("sp_bss_eta",)
    formula = "Omega_bss(w) = eta * sum_{i=1..k} sigma_{-i}(F)^2, F = batch x pre-logits features"
    citation = BSS_CITATION
    search_fields = ("sp_bss_eta",)
    search_grid = (1e-4, 1e-3, 1e-2)

    def __init__(self, eta: float = 0.001, k: int = 1):
        if eta < 0 or k < 1:
            raise ConfigError(f"BSS needs eta >= 0 and k >= 1; got eta={eta}, k={k}.")
        self.eta, self.k = float(eta), int(k)
        self.head_modules: list[str] = []
        self._features: Tensor | None = None

    @classmethod
    def check_config(cls, args, selected: bool) -> None:
        if args.sp_bss_k < 1:
            raise ConfigError(f"sp_bss_k must be >= 1; got {args.sp_bss_k}.")

    @classmethod
    def from_config(cls, args) -> BatchSpectralShrinkage:
        return cls(eta=args.sp_bss_eta, k=args.sp_bss_k)

    def setup(self, model: nn.Module, context: FeatureContext) -> None:
        self.head_modules = context.head_modules or find_head_modules(model)

    def _hooks(self, model: nn.Module) -> list:
        inner = unwrap_model(model)
        module = inner.get_submodule(self.head_modules[0])

        def keep_input(_module, args):
            self._features = args[0]

        return [module.register_forward_pre_hook(keep_input)]

    def penalty(self, inputs: dict[str, Any]) -> Tensor:
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("BSS saw no features: the head hook did not fire during the forward.")
        return self.eta * bss_value(features.flatten(1), self.k)

    @property
    def active(self) -> bool:
        return self.eta != 0.0

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eta": self.eta, "k": self.k}


def bss_value(features: Tensor, k: int) -> Tensor:
    """sum of the k smallest squared singular values of a (batch x d) matrix.

    sigma_i(F)^2 are the eigenvalues of the smaller Gram matrix (F F^T or F^T F); its eigendecomposition in float64
    is cheap (batch x batch) and keeps the small eigenvalues accurate, where a full SVD of F costs far more.
    """
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.double()
        gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f
        eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return eigenvalues[:k].clamp_min(0).sum().to(torch.float32 if features.dtype != torch.float64 else torch.float64)
