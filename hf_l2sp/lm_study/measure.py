"""What every study point is measured on: the mean next-token loss of the target and of each retention set, and the
mean per-token KL(p_start ‖ p) on target text, the same quantity `sp_retention_kl` logs in training."""

from __future__ import annotations

import torch

from ..forgetting.measures import shifted_mask, token_kl

EVAL_BATCH = 4


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, keep_logits: int = 0) -> tuple[float, torch.Tensor | None]:
    """Mean loss over every predicted token of `blocks` (all of one length, so the batch means average exactly);
    also returns the logits of the first `keep_logits` blocks."""
    was_training = model.training
    model.eval()
    total, kept = 0.0, []
    for start in range(0, blocks.shape[0], EVAL_BATCH):
        batch = blocks[start:start + EVAL_BATCH]
        out = model(input_ids=batch, labels=batch)
        total += float(out.loss) * batch.shape[0]
        if start < keep_logits:
            kept.append(out.logits[: keep_logits - start].float())
    model.train(was_training)
    return total / blocks.shape[0], (torch.cat(kept) if kept else None)


def mean_kl(start_logits: torch.Tensor, logits: torch.Tensor) -> float:
    mask = shifted_mask(None, None, logits)
    summed, counted = token_kl(start_logits, logits, mask)
    return float(summed.sum() / counted.sum())


def measure(model, data, kl_blocks: int, start_logits: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """{'target_loss', '<set>_loss' for each retention set, 'kl'} and the target logits the KL was taken on."""
    target, logits = mean_loss(model, data.target, keep_logits=kl_blocks)
    values = {"target_loss": target}
    for name, blocks in data.retention.items():
        values[f"{name}_loss"] = mean_loss(model, blocks)[0]
    values["kl"] = 0.0 if start_logits is None else mean_kl(start_logits, logits)
    return values, logits


def distance(model, start: dict[str, torch.Tensor]) -> float:
    """‖w − w0‖ over every trained tensor; with LoRA, over each adapted layer's merged update s·B·A."""
    total = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and getattr(module, "active_adapters", None):
                for adapter in module.active_adapters:
                    total += float(module.get_delta_weight(adapter).double().pow(2).sum())
        if total == 0.0:
            for name, parameter in model.named_parameters():
                if name in start:
                    total += float((parameter.detach().double() - start[name].double()).pow(2).sum())
    return total ** 0.5
