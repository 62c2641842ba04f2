"""Diagonal Fisher information of a source classifier at its pretrained weights w0, from per-sample gradients.

    exact      F_j = (1/m) sum_i sum_k p_k(x_i) (d log p_k(x_i) / d w_j)^2      (the paper's definition)
    sampled    F_j = (1/(m n)) sum_i sum_{d=1..n} (d log p_{y_id}(x_i) / d w_j)^2,  y_id ~ p(. | x_i)
               an unbiased Monte-Carlo estimate of `exact`, practical for 1000 source classes
    empirical  F_j = (1/m) sum_i (d log p_{y_i}(x_i) / d w_j)^2 with the dataset's labels y_i

Gradients are per sample, batched with `torch.func` (`vmap` over `grad` / `jacrev`) in chunks that bound memory;
the model runs in eval mode (BatchNorm uses its running statistics, so samples do not interact). Squaring a
mini-batch gradient is a different quantity and is never done. Under torch.distributed each rank sums over its
shard of samples and one all-reduce combines the sums.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from .fisher_io import FisherDiagonal
from . import per_sample
from ..loading.forward import call_image_model, logits_of
from ..loading.model_parts import base_prefix, checkpoint_key, unwrap_model
from ..utils.errors import ConfigError

MODES = ("exact", "sampled", "empirical")
METHODS = ("auto", "hooks", "vmap")
NORMALIZATIONS = ("none", "mean", "max")


def _logits(model: nn.Module, params_and_buffers: dict, x: Tensor) -> Tensor:
    out = functional_call(model, params_and_buffers, args=(), kwargs={"pixel_values": x}) if _takes_pixel_values(
        model) else functional_call(model, params_and_buffers, (x,))
    return logits_of(out)


def _takes_pixel_values(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


def _check_source_head(model: nn.Module, x: Tensor) -> int:
    timm_model = getattr(model, "timm_model", model)
    headless = getattr(timm_model, "num_classes", None) == 0
    with torch.no_grad():
        logits = _logits(model, {**dict(model.named_parameters()), **dict(model.named_buffers())}, x[:1])
    if headless or logits.ndim != 2 or logits.shape[1] < 2:
        raise ConfigError(f"estimate_fisher needs the source model with its classification head (logits over the "
                          f"source classes); this model returns shape {tuple(logits.shape)}. Load the pretrained "
                          "checkpoint as is (e.g. the 1000 ImageNet outputs), not a headless or re-headed copy.")
    return logits.shape[1]


def estimate_fisher(model: nn.Module, batches: Iterable[dict[str, Any]], mode: str = "exact", *,
                    num_samples: int | None = None, draws: int = 1, chunk_size: int = 8, class_chunk: int = 64,
                    generator: torch.Generator | None = None, normalize: str = "none", method: str = "auto",
                    metadata: dict[str, Any] | None = None, progress: bool = False) -> FisherDiagonal:
    """Diagonal Fisher of `model` (with its source head) over `batches` of {'pixel_values', ['labels']}.

    num_samples: stop after this many samples in total (over all ranks); draws: labels sampled per input (sampled);
    chunk_size: samples per vmap call; class_chunk: classes per Jacobian (exact); normalize: 'none' (raw, as in
    the paper), 'mean' (divide by the mean entry, so alpha keeps the scale it has with plain L2-SP) or 'max'.
    method: 'hooks' (per-layer per-sample rules on one batched forward and batched backward passes, see
    per_sample.py; exact classes only: nn.Conv2d, timm's Conv2dSame, nn.Linear, nn.BatchNorm2d, timm's
    BatchNormAct2d; an error if a layer has no rule), 'vmap' (torch.func, any layer), or 'auto' (per layer: hooks
    where a rule models the layer exactly, vmap for the others, in the same pass over the data). The metadata says
    which: `method` ('hooks', 'vmap' or 'hooks+vmap') and `method_per_layer` (JSON, module name -> path).
    Keys are checkpoint names (no wrapper or base-model prefix). Only trainable parameters are estimated; the
    names of frozen ones are listed in the metadata.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}; got {normalize!r}.")
    if draws < 1 or chunk_size < 1 or class_chunk < 1:
        raise ConfigError("draws, chunk_size and class_chunk must be >= 1.")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    model = unwrap_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    routes = _routes(model, trainable, method)
    if method == "hooks" and "vmap" in routes.values():
        unruled = sorted(m for m, r in routes.items() if r == "vmap")
        raise ConfigError(f"method='hooks' has no per-sample rule for layers {unruled[:5]} of "
                          f"{type(model).__name__}; use method='auto' (hooks where exact, vmap for those) or 'vmap'.")
    was_training = model.training
    model.eval()
    try:
        sums, count, frozen = _accumulate(model, batches, mode, num_samples, draws, chunk_size, class_chunk,
                                          generator, progress, routes)
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("estimate_fisher saw zero samples: the data is empty or num_samples is 0.")
    prefix = base_prefix(model)
    tensors = {checkpoint_key(name, prefix): (s / count).cpu() for name, s in sums.items()}
    if normalize != "none":
        flat = torch.cat([t.flatten() for t in tensors.values()])
        scale = flat.mean() if normalize == "mean" else flat.max()
        if scale <= 0:
            raise ConfigError("The Fisher diagonal is zero everywhere; it cannot be normalised.")
        tensors = {k: t / scale for k, t in tensors.items()}
    from ..utils.version import __version__

    used = sorted(set(routes.values()))
    meta = {"mode": mode, "method": "+".join(used) if used else method, "method_per_layer": json.dumps(routes),
            "num_samples": count, "draws": draws if mode == "sampled" else 1, "normalize": normalize,
            "frozen_parameters_skipped": ",".join(frozen), "hf_l2sp_version": __version__, **(metadata or {})}
    return FisherDiagonal(tensors, {k: str(v) for k, v in meta.items()}, source="estimate_fisher")


def _routes(model: nn.Module, trainable: set[str], method: str) -> dict[str, str]:
    """Module name -> 'hooks' or 'vmap' for every module owning a trainable parameter.

    'auto' and 'hooks' give the hooks path to the layers with an exact per-sample rule (per_sample.rule_of) and vmap
    to the rest; 'vmap' gives vmap to all.
    """
    ruled, other = per_sample.split_layers(model, trainable)
    if method == "vmap":
        return {name: "vmap" for name in {**ruled, **other}}
    return {**{name: "hooks" for name in ruled}, **{name: "vmap" for name in other}}


def _owned(model: nn.Module, modules: set[str], names: set[str]) -> set[str]:
    """The parameter names in `names` that the modules `modules` own directly."""
    out = set()
    for module_name in modules:
        for n, _ in model.get_submodule(module_name).named_parameters(recurse=False):
            full = f"{module_name}.{n}" if module_name else n
            if full in names:
                out.add(full)
    return out


def _draw(model: nn.Module, x: Tensor, draws: int, generator) -> Tensor:
    """(batch, draws) labels from the model's own predictive distribution (when no hooks forward provides them)."""
    with torch.no_grad():
        probs = logits_of(call_image_model(model, x)).float().softmax(-1)
    return _draw_from(probs, draws, generator)


def _draw_from(probs: Tensor, draws: int, generator) -> Tensor:
    """One multinomial draw per batch, whichever path computed `probs`: both paths then use the same labels."""
    return torch.multinomial(probs.cpu(), draws, replacement=True, generator=generator).to(probs.device)


def _accumulate(model, batches, mode, num_samples, draws, chunk_size, class_chunk, generator, progress, routes):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    hook_names = _owned(model, {m for m, r in routes.items() if r == "hooks"}, set(params))
    hook_sums = {n: sums[n] for n in hook_names}  # the same tensors: both paths add into `sums`
    vmap_params = {n: p for n, p in params.items() if n not in hook_names}
    fixed = {n: p for n, p in params.items() if n in hook_names}  # held constant in the vmap path's calls
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    local_cap = None if num_samples is None else num_samples // world + (1 if rank < num_samples % world else 0)
    count, checked = 0, False
    bar = _progress(num_samples, progress and rank == 0)
    for index, batch in enumerate(batches):
        if world > 1 and index % world != rank:  # each rank takes every world-th batch: a shard of the samples
            continue
        x = batch["pixel_values"]
        labels = batch.get("labels")
        if local_cap is not None:
            x = x[: max(local_cap - count, 0)]
            labels = labels[: len(x)] if labels is not None else None
        if len(x) == 0:
            break
        device = next(iter(params.values())).device
        x = x.to(device)
        if not checked:
            _check_source_head(model, x)
            checked = True
        if mode == "empirical" and labels is None:
            raise ConfigError("mode='empirical' needs labels in the batches ('labels').")
        y = labels.to(device)[:, None] if mode == "empirical" else None
        if hook_sums:  # the hooks path handles the whole batch at once; sampled labels are drawn from its forward
            y = _add_with_hooks(model, x, y, hook_sums, mode, draws, generator)
        elif mode == "sampled":
            y = _draw(model, x, draws, generator)
        if vmap_params:  # the same labels (draws) as the hooks path
            for start in range(0, len(x), chunk_size):
                xc = x[start:start + chunk_size]
                if mode == "exact":
                    _add_exact(model, vmap_params, fixed, buffers, xc, sums, class_chunk)
                else:
                    _add_sampled(model, vmap_params, fixed, buffers, xc, y[start:start + chunk_size], sums)
        count += len(x)
        bar.update(len(x))
    bar.close()
    if world > 1:
        names = sorted(sums)
        device = sums[names[0]].device
        flat = torch.cat([sums[n].flatten() for n in names] + [torch.tensor([float(count)], device=device)])
        dist.all_reduce(flat)
        count = int(flat[-1].item())
        offset = 0
        for n in names:
            sums[n] = flat[offset:offset + sums[n].numel()].view_as(sums[n])
            offset += sums[n].numel()
    return sums, count, frozen


def _add_with_hooks(model, x, labels, sums, mode, draws=1, generator=None):
    """One forward, then one batched backward per class (exact) or per label column (sampled draws, empirical).

    Returns the labels used ((batch, draws); drawn here from this forward in sampled mode), for the vmap path.
    """
    # The input requires grad so that it can be a target when needed (below); nothing is computed for it otherwise.
    x = x.detach().requires_grad_(True)
    with per_sample.SquaredGradAccumulator(model, sums) as acc:
        logp = logits_of(call_image_model(model, x)).float().log_softmax(-1)
        if mode == "sampled":
            labels = _draw_from(logp.detach().exp(), draws, generator)
        if mode == "exact":
            probs = logp.detach().exp()
            targets = [(torch.full((len(x),), k, device=x.device), probs[:, k]) for k in range(logp.shape[1])]
        else:  # labels: (batch, draws); each draw weighs 1/draws
            share = torch.full((len(x),), 1.0 / labels.shape[1], device=x.device)
            targets = [(labels[:, d], share) for d in range(labels.shape[1])]
        if not acc.targets:
            raise ConfigError("estimate_fisher: no layer output requires grad; the model has no trainable parameters.")
        acc.passes = len(targets)  # picks each layer's route (see per_sample.py)
        # An in-place activation right after a hooked layer, with no target before it: the backward would stop at
        # the activation's output and never reach the hooked value, whose Fisher would read 0. Asking for the
        # input's gradient carries the backward through it.
        gradient_targets = [*acc.targets, x] if acc.modified_in_place() else acc.targets
        for index, (y, weights) in enumerate(targets):
            acc.weights = weights
            # Gradients with respect to the hooked layer outputs only: parameter gradients are never formed.
            torch.autograd.grad(logp.gather(1, y[:, None]).sum(), gradient_targets,
                                retain_graph=index < len(targets) - 1, allow_unused=True)
    return labels


def _add_exact(model, params, fixed, buffers, x, sums, class_chunk):
    """sum_i sum_k p_k (grad log p_k)^2 over `params` for the chunk, classes in blocks of `class_chunk`.

    `fixed` are the other trainable parameters (those the hooks path handles), passed as constants.
    """
    with torch.no_grad():
        probs = _logits(model, {**fixed, **params, **buffers}, x).float().softmax(-1)
    num_classes = probs.shape[1]

    def log_prob(p, xi, classes):
        return _logits(model, {**fixed, **p, **buffers}, xi.unsqueeze(0)).float().log_softmax(-1)[0, classes]

    for k0 in range(0, num_classes, class_chunk):
        classes = torch.arange(k0, min(k0 + class_chunk, num_classes), device=x.device)
        jac = vmap(jacrev(log_prob), in_dims=(None, 0, None))(params, x, classes)  # name -> (B, Kc, *shape)
        weights = probs[:, classes]
        for name, j in jac.items():
            sums[name] += torch.einsum("bk,bk...->...", weights, j.float().square())


def _add_sampled(model, params, fixed, buffers, x, labels, sums):
    """sum over samples and label columns of (grad log p_y)^2 / columns; labels (batch, draws), given or drawn."""
    draws = labels.shape[1]
    x = x.repeat_interleave(draws, dim=0)
    labels = labels.flatten()

    def log_prob(p, xi, yi):
        logp = _logits(model, {**fixed, **p, **buffers}, xi.unsqueeze(0)).float().log_softmax(-1)[0]
        return logp.gather(0, yi.unsqueeze(0)).squeeze(0)  # logp[yi], in a form vmap accepts

    grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, x, labels)
    for name, g in grads.items():
        sums[name] += g.float().square().sum(0) / draws


def _progress(total, enabled):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="img", desc="Fisher")

    class _Silent:
        def update(self, _n):
            pass

        def close(self):
            pass

    return _Silent()
