"""Runs a `StudyPlan`: sources, then the lr, grid and final phases, each on a pool of one-thread workers.

Finished runs are found by key under `<results>/runs/` and skipped, so the same command resumes a killed study.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from .protocol import GRIDS, Setting, StudyPlan, default_value, grid_point
from .runs import RunSpec, execute, read_record, result_path
from .selection import choose
from .sources import prepare_setting

logger = logging.getLogger("hf_l2sp.study")
SELECTION_FILE = "selection.json"


def configure_process(threads: int | None, flush_denormal: bool) -> None:
    """Thread count and denormal flushing for a run process; quiet libraries (the study prints its own progress)."""
    import torch

    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    # Weights and activations decaying toward zero can become denormal floats, which x86 handles in microcode
    # (many times slower); flushing them to zero changes nothing measurable in the results.
    torch.set_flush_denormal(flush_denormal)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def _work(spec: RunSpec, results_dir: str) -> dict:
    return execute(spec, results_dir)


@dataclass
class PhaseReport:
    name: str
    total: int
    executed: int
    seconds: float


@dataclass
class Study:
    plan: StudyPlan
    results_dir: Path
    workers: int = 2
    flush_denormal: bool = True
    phases: list[PhaseReport] = field(default_factory=list)

    def __post_init__(self):
        self.results_dir = Path(self.results_dir)

    # ---- phases ---------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Everything, in order; returns the selection (learning rate and coefficients per setting)."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        configure_process(None, self.flush_denormal)
        prepared = [prepare_setting(s, self.results_dir) for s in self.plan.settings]
        selection = {}
        lr_specs = {s.name: [self.spec("lr", s, f, "none", self.plan.selection_size, seed, lr, 0.0)
                             for seed in self.plan.selection_seeds for lr in self.plan.schedule.learning_rates]
                    for s, f in prepared} if self.plan.grid else {}
        lr_records = self.execute_phase("lr", [x for specs in lr_specs.values() for x in specs])
        for setting, fisher in prepared:
            sel = selection.setdefault(setting.name, {"regularizers": {}})
            if self.plan.grid:
                sel["learning_rate"] = choose(_of(lr_records, setting.name), "learning_rate").as_dict()
            else:
                rates = self.plan.schedule.learning_rates
                sel["learning_rate"] = {"value": rates[len(rates) // 2], "fixed": True}
        grid_specs = []
        if self.plan.grid:
            for setting, fisher in prepared:
                lr = selection[setting.name]["learning_rate"]["value"]
                for reg in self.plan.regularizers:
                    values = GRIDS[reg] if reg != "none" else ()  # `none` was already run in the lr phase
                    grid_specs += [self.spec("grid", setting, fisher, reg, self.plan.selection_size, seed, lr, v)
                                   for seed in self.plan.selection_seeds for v in values]
        grid_records = self.execute_phase("grid", grid_specs)
        for setting, fisher in prepared:
            sel = selection[setting.name]
            lr = sel["learning_rate"]["value"]
            for reg in self.plan.regularizers:
                if not self.plan.grid:
                    sel["regularizers"][reg] = {"value": default_value(reg), "fixed": True}
                elif reg == "none":
                    none_runs = [r for r in _of(lr_records, setting.name) if r["learning_rate"] == lr]
                    sel["regularizers"][reg] = choose(none_runs, "grid_value").as_dict()
                else:
                    runs = [r for r in _of(grid_records, setting.name) if r["regularizer"] == reg]
                    sel["regularizers"][reg] = choose(runs, "grid_value").as_dict()
        self._write_selection(selection)
        finals = [self.spec("final", setting, fisher, reg, size, seed, selection[setting.name]["learning_rate"]["value"],
                            selection[setting.name]["regularizers"][reg]["value"])
                  for setting, fisher in prepared for reg in self.plan.regularizers
                  for size in self.plan.sizes for seed in self.plan.seeds]
        self.execute_phase("final", finals)
        return selection

    def spec(self, phase: str, setting: Setting, fisher: str, regularizer: str, size: int, seed: int,
             learning_rate: float, value: float) -> RunSpec:
        schedule = self.plan.schedule
        return RunSpec(
            phase=phase, setting=setting.name, transfer=setting.transfer, model=setting.model,
            dataset=setting.dataset, regularizer=regularizer, size=size, seed=seed, learning_rate=learning_rate,
            steps=schedule.steps(size), hyperparameters=tuple(sorted(grid_point(regularizer, value).items())),
            grid_value=value, validation_fraction=setting.validation_fraction, image_size=setting.image_size,
            batch_size=schedule.batch_size, eval_batch_size=schedule.eval_batch_size,
            warmup_fraction=schedule.warmup_fraction, momentum=schedule.momentum,
            delta_warmup_steps=schedule.delta_warmup_steps, delta_attention_batches=schedule.delta_attention_batches,
            fisher_file=fisher if regularizer == "l2_sp_fisher" else None,
        )

    def execute_phase(self, name: str, specs: list[RunSpec]) -> list[dict]:
        """Run the specs that have no record yet; return every spec's record. Raises if any run failed."""
        start = time.perf_counter()
        pending = [s for s in specs if read_record(result_path(self.results_dir, s)) is None]
        if pending:
            logger.info("phase %s: %d runs, %d already done", name, len(specs), len(specs) - len(pending))
        failures = []
        for done, (spec, outcome) in enumerate(self._map(pending), start=1):
            if isinstance(outcome, BaseException):
                failures.append(f"{spec.key}: {type(outcome).__name__}: {outcome}")
                logger.error("run %s failed: %s", spec.key, outcome)
                continue
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (len(pending) - done)
            test = outcome.get("test_accuracy")
            logger.info("[%s %d/%d] %s val %.4f%s drift %.3f %.1fs (eta %.0f min)", name, done, len(pending),
                        spec.key, outcome["val_accuracy"], "" if test is None else f" test {test:.4f}",
                        outcome["drift"] or 0.0, outcome["wall_seconds"], eta / 60)
        self.phases.append(PhaseReport(name, len(specs), len(pending) - len(failures),
                                       time.perf_counter() - start))
        if failures:
            raise RuntimeError(f"{len(failures)} run(s) of phase {name!r} failed (rerun the same command to retry "
                               "them; finished runs are kept):\n" + "\n".join(failures[:10]))
        return [read_record(result_path(self.results_dir, s)) for s in specs]

    def _map(self, specs: list[RunSpec]):
        if not specs:
            return
        if self.workers <= 1:
            for spec in specs:
                try:
                    yield spec, execute(spec, self.results_dir)
                except Exception as err:  # recorded and reported once the phase ends
                    yield spec, err
            return
        context = get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=configure_process,
                                 initargs=(1, self.flush_denormal)) as pool:
            futures = {pool.submit(_work, spec, str(self.results_dir)): spec for spec in specs}
            for future in as_completed(futures):
                error = future.exception()
                yield futures[future], error if error is not None else future.result()

    def _write_selection(self, selection: dict) -> None:
        path = self.results_dir / SELECTION_FILE
        path.write_text(json.dumps(selection, indent=1))


def _of(records: list[dict], setting: str) -> list[dict]:
    return [r for r in records if r["setting"] == setting]

