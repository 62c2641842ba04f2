from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from ..loading.forward import call_image_model, logits_of
from ..loading.model_parts import canonical_name, unwrap_model
from ..loading.stages import stage_modules
from .feature import FeatureContext, FeatureRegularizer
from .registry import register_feature_regularizer
from ..utils.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)
ATTENTION_FILE = "delta_attention.safetensors"
DELTA_CITATION = """@inproceedings{li2019delta,
  title     = {{DELTA}: {DE}ep Learning Transfer using Feature Map with Attention for Convolutional Networks},
  author    = {Li, Xingjian and Xiong, Haoyi and Wang, Hanchao and Rao, Yuxuan and Liu, Liping and Chen, Zeyu and
               Huan, Jun},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2019}
}"""


@register_feature_regularizer("delta")
class DELTA(FeatureRegularizer):
    """DELTA (Li et al., ICLR 2019): keep the fine-tuned network's feature maps close to the source network's on
    the same batch, weighting each channel by how much the target task needs it.

    Omega_delta(w) = alpha_delta * 1/2 sum_l sum_b sum_c C_l W_lc ||FM_lc(w, x_b) - FM_lc(w0, x_b)||^2 / (H_l W_l)

    with C_l the channel count of layer l and W_l a distribution over its channels (C_l W_lc averages 1; uniform W
    gives 1/2 sum ||.||^2/(HW)). The sum over b runs over the optimizer step's global batch (per-device batch x
    accumulation steps x processes), as the official code sums over its batch: on one device without accumulation
    the two are the same number, and alpha_delta keeps the official meaning (it grows with the batch size). Because
    the sum is over the global batch, splitting that batch into micro-batches or processes never changes the update
    (`batch_sum = True`: the trainer scales each micro-batch's sum by accumulation steps x processes).
    FM(w0) comes from a frozen copy of the source network in eval mode, run under no_grad on the same batch; it is
    never in the optimizer nor in checkpoints. Attention (the default): after a head-only warm-up on target data,
    zero one channel at a time and measure the rise in cross-entropy on a few target batches;
    W_l = softmax(zscore(rise) / 5). Used alone it adds the paper's beta/2 ||w_new||^2 on the new head.
    """

    title = "DELTA (Li et al., ICLR 2019)"
    listing_order = 60
    coefficient_fields = ("sp_delta_alpha",)
    formula = ("Omega_delta(w) = alpha_delta/2 * sum_l sum_b sum_c C_l W_lc ||FM_lc(w,x_b) - FM_lc(w0,x_b)||^2 "
               "/ (H_l W_l)")
    citation = DELTA_CITATION
    adds_head_l2 = True
    batch_sum = True
    search_fields = ("sp_delta_alpha",)
    search_grid = (1e-3, 1e-2, 1e-1)
    protocol_fixed = {"sp_beta": 0.01}  # the paper's L2 on the new head

    def __init__(self, alpha: float = 0.01, layers: list[str] | None = None, attention: str = "computed",
                 attention_batches: int = 4, warmup_steps: int = 50):
        if alpha < 0:
            raise ConfigError(f"sp_delta_alpha must be >= 0; got {alpha}.")
        self.alpha, self.layers, self.attention_spec = float(alpha), layers, attention
        self.attention_batches, self.warmup_steps = attention_batches, warmup_steps
        self.weights: dict[str, Tensor] = {}
        self.source: nn.Module | None = None
        self._target: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, args) -> DELTA:
        layers = [s.strip() for s in args.sp_delta_layers.split(",")] if args.sp_delta_layers else None
        return cls(alpha=args.sp_delta_alpha, layers=layers, attention=args.sp_delta_attention,
                   attention_batches=args.sp_delta_attention_batches, warmup_steps=args.sp_delta_warmup_steps)

    # ---- set-up: layers, frozen source copy, channel weights --------------------------------------------------------

    def setup(self, model: nn.Module, context: FeatureContext) -> None:
        model = unwrap_model(model)
        self.layers = [canonical_name(name) for name in (self.layers or stage_modules(model))]
        if not self.layers:
            raise ConfigError(f"DELTA needs layers to compare; {type(model).__name__} has neither timm feature_info "
                              "nor transformers encoder.stages. Set sp_delta_layers to module names, comma separated.")
        known = {canonical_name(n) for n, _ in model.named_modules()}
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            raise ConfigError(f"sp_delta_layers names unknown modules {unknown}.")
        self.source = build_source_copy(model, context.anchors, context.device)
        if self.attention_spec == "uniform":
            self.weights = {}
        elif self.attention_spec == "computed":
            self.weights = compute_channel_attention(model, self.layers, context, self.attention_batches,
                                                     self.warmup_steps)
        else:
            self.weights = self._load_weights(self.attention_spec)
        self.weights = {k: v.to(context.device) for k, v in self.weights.items()}

    def _load_weights(self, path: str) -> dict[str, Tensor]:
        file = Path(path)
        file = file / ATTENTION_FILE if file.is_dir() else file
        if not file.is_file():
            raise MissingFileError(f"sp_delta_attention {path!r}: not 'computed', 'uniform' or an attention file.")
        weights = load_file(str(file))
        missing = [name for name in self.layers if name not in weights]
        if missing:
            raise ConfigError(f"DELTA attention file {path!r} has no weights for layers {missing}.")
        return {name: weights[name] for name in self.layers}

    # ---- per step ----------------------------------------------------------------------------------------------

    def _hooks(self, model: nn.Module) -> list:
        inner = unwrap_model(model)

        def keep(name):
            def hook(_module, _args, output):
                self._target[name] = output
            return hook

        return [inner.get_submodule(name).register_forward_hook(keep(name)) for name in self.layers]

    def penalty(self, inputs: dict[str, Any]) -> Tensor:
        target, self._target = self._target, {}
        with torch.inference_mode():
            source = feature_maps(self.source, self.layers, inputs["pixel_values"])
        total = None
        for name in self.layers:
            term = delta_layer_term(target[name], source[name], self.weights.get(name))
            total = term if total is None else total + term
        return self.alpha * total

    @property
    def active(self) -> bool:
        return self.alpha != 0.0

    def state_files(self) -> dict[str, dict[str, Tensor]]:
        return {ATTENTION_FILE: {k: v.detach().cpu().contiguous() for k, v in self.weights.items()}} if \
            self.weights else {}

    def load_state(self, folder: str) -> None:
        if self.weights and (Path(folder) / ATTENTION_FILE).is_file():
            device = next(iter(self.weights.values())).device
            self.weights = {k: v.to(device) for k, v in self._load_weights(folder).items()}

    def config_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha, "layers": self.layers,
                "attention": self.attention_spec if self.attention_spec in ("uniform", "computed") else "file"}


def delta_layer_term(fm: Tensor, fm0: Tensor, weights: Tensor | None) -> Tensor:
    """1/2 sum_b sum_c C W_c ||fm - fm0||^2 / (H W) for one layer (uniform W when `weights` is None)."""
    fm, fm0 = fm.float(), fm0.float().detach()
    channels = fm.shape[1]
    spatial = math.prod(fm.shape[2:]) if fm.ndim > 2 else 1
    per_channel = (fm - fm0).square().flatten(2).sum(-1).sum(0) / spatial  # (C,), summed over the batch
    scale = channels * weights.float() if weights is not None else torch.ones_like(per_channel)
    return 0.5 * (scale * per_channel).sum()


def feature_maps(model: nn.Module, layers: list[str], pixel_values: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _a, output, name=name: out.__setitem__(name, output)) for name in layers]
    try:
        call_image_model(model, pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return out


def build_source_copy(model: nn.Module, anchors: dict[str, Tensor], device) -> nn.Module:
    """A frozen eval-mode copy holding w0 on S (plain module: never in the optimizer or in checkpoints)."""
    source = copy.deepcopy(unwrap_model(model))
    with torch.no_grad():
        for name, param in source.named_parameters():
            if canonical_name(name) in anchors:
                param.copy_(anchors[canonical_name(name)])
            param.requires_grad_(False)
    return source.to(device).eval()


def compute_channel_attention(model: nn.Module, layers: list[str], context: FeatureContext, batches: int,
                              warmup_steps: int) -> dict[str, Tensor]:
    """DELTA's supervised channel attention: head-only warm-up, then the CE rise when zeroing each channel."""
    probe = copy.deepcopy(unwrap_model(model)).to(context.device)
    heads = context.head_names
    head_params = [p for n, p in probe.named_parameters() if canonical_name(n) in heads]
    for name, param in probe.named_parameters():
        param.requires_grad_(canonical_name(name) in heads)
    data = []
    for batch in context.train_batches():
        data.append({k: v.to(context.device) for k, v in batch.items() if k in ("pixel_values", "labels")})
        if len(data) >= max(batches, 1):
            break
    if not data:
        raise ConfigError("DELTA channel attention needs training batches; the training set is empty.")
    if head_params and warmup_steps:
        optimizer = torch.optim.SGD(head_params, lr=0.01, momentum=0.9, weight_decay=1e-4)
        probe.train()
        for step in range(warmup_steps):
            batch = data[step % len(data)]
            loss = _ce(probe, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    probe.eval()
    weights = {}
    with torch.no_grad():
        base = sum(_ce(probe, b).item() for b in data) / len(data)
        for name in layers:
            module = probe.get_submodule(name)
            channels = feature_maps(probe, [name], data[0]["pixel_values"])[name].shape[1]
            rise = torch.zeros(channels)
            for c in range(channels):
                handle = module.register_forward_hook(lambda _m, _a, out, c=c: _zero_channel(out, c))
                try:
                    rise[c] = sum(_ce(probe, b).item() for b in data) / len(data) - base
                finally:
                    handle.remove()
            weights[name] = attention_from_rise(rise)
    logger.info("DELTA channel attention computed on %d batches for layers %s", len(data), layers)
    return weights


def attention_from_rise(rise: Tensor) -> Tensor:
    """softmax(zscore(rise) / 5): DELTA's temperature; a constant rise gives uniform weights."""
    std = rise.std(unbiased=False)
    z = (rise - rise.mean()) / std if std > 0 else torch.zeros_like(rise)
    return torch.softmax(z / 5.0, dim=0)


def _zero_channel(output: Tensor, channel: int) -> Tensor:
    output = output.clone()
    output[:, channel] = 0
    return output


def _ce(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = logits_of(call_image_model(model, batch["pixel_values"]))
    return F.cross_entropy(logits.float(), batch["labels"])
