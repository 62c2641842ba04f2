"""The penalty's log: per-window averages kept on device, reduced across processes only when a log is written.

Two kinds of values, reduced differently:
- weight parts (Omega of the weight regularizer, its head part, ||w_S - w0_S||^2): the same on every process under
  DDP; under FSDP2 each process holds the partial sum of its own shards, so they are summed across processes.
- batch parts (the task loss without Omega, each feature penalty): computed on each process's own micro-batches,
  so they are averaged across processes, like Trainer's `loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..penalties import PenaltyTerms


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class PenaltyLog:
    """Accumulates on device (no host sync per step) and remembers the first step whose penalty is not finite."""

    def __init__(self, feature_names: list[str]):
        self.feature_names = list(feature_names)
        self.bad_step: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self._weights: Tensor | None = None
        self._weight_count = 0
        self._batch: Tensor | None = None
        self._batch_count = 0
        self._side_steps = 0

    @property
    def weight_evaluations(self) -> int:
        """Evaluations of the weight regularizer in the window (one per optimizer step on the optimizer side)."""
        return self._weight_count

    @property
    def side_steps(self) -> int:
        """Optimizer steps in the window where Omega acted outside the loss (sp_mode grad/decoupled, ZeRO-3)."""
        return self._side_steps

    @property
    def empty(self) -> bool:
        return not (self._weight_count or self._batch_count)

    def add_weight_terms(self, terms: PenaltyTerms, step: int) -> None:
        """One evaluation of the weight regularizer (per micro-batch in `loss` mode, per step in `grad`)."""
        penalty = terms.penalty.detach().float()
        values = torch.stack([penalty, terms.head_penalty.detach().float().to(penalty.device),
                              terms.distance.detach().float().to(penalty.device).square()])
        self._weights = values if self._weights is None else self._weights + values
        self._weight_count += 1
        self._watch(penalty, step)

    def add_side_step(self, terms: PenaltyTerms | None, step: int) -> None:
        """One optimizer step of a penalty applied outside the loss, with its terms when that step measured them."""
        self._side_steps += 1
        if terms is not None:
            self.add_weight_terms(terms, step)

    def add_batch_terms(self, task_loss: Tensor, features: dict[str, Tensor], step: int) -> None:
        """One micro-batch: its task loss (a mean over the micro-batch) and each feature penalty's per-step value."""
        values = torch.stack([task_loss.detach().float().mean(),
                              *(features[name].detach().float().to(task_loss.device) for name in self.feature_names)])
        self._batch = values if self._batch is None else self._batch + values
        self._batch_count += 1
        if self.feature_names:
            self._watch(values[1:].sum(), step)

    def _watch(self, value: Tensor, step: int) -> None:
        if self.bad_step is None:
            self.bad_step = torch.full((), -1, dtype=torch.long, device=value.device)
        newly_bad = ~torch.isfinite(value) & (self.bad_step < 0)
        self.bad_step = torch.where(newly_bad, step, self.bad_step)

    def first_bad_step(self) -> int | None:
        step = int(self.bad_step) if self.bad_step is not None else -1
        return step if step >= 0 else None

    def flush(self, weights_sharded: bool) -> dict[str, float]:
        """The window's averages as log entries (a collective call when several processes run), then reset.

        Every process must call it at the same step, as Trainer does with `log`.
        """
        world = _world_size()
        logs: dict[str, float] = {}
        weight_penalty = 0.0
        if self._weight_count:
            weights = self._weights / self._weight_count
            if weights_sharded and world > 1:  # partial sums of each process's shards
                dist.all_reduce(weights)
            weight_penalty, head, sq_distance = weights.tolist()
            logs.update({"sp/head_penalty": round(head, 8), "sp/distance": round(max(sq_distance, 0.0) ** 0.5, 8)})
        feature_total = 0.0
        if self._batch_count:
            batch = self._batch / self._batch_count
            if world > 1:
                dist.all_reduce(batch)
                batch /= world
            task_loss, *features = batch.tolist()
            logs["sp/task_loss"] = round(task_loss, 8)
            for name, value in zip(self.feature_names, features):
                logs[f"sp/{name}"] = round(value, 8)
            feature_total = sum(features)
        logs["sp/penalty"] = round(weight_penalty + feature_total, 8)
        self.reset()
        return logs


def step_is_logged(state, args) -> bool:
    """Whether the optimizer step now running (Trainer `state`, `args`) ends in a training log by Trainer's own rule
    (the first step with logging_first_step, every logging_steps-th) or ends the run. Where Omega acts outside the
    loss, only these steps compute its value; a log at another step (epoch strategy, a callback) measures it then."""
    step, every = state.global_step + 1, state.logging_steps
    return bool((step == 1 and args.logging_first_step)
                or (args.logging_strategy == "steps" and every and step % every == 0)
                or step >= state.max_steps)
