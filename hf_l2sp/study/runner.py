"""Runs a `StudyPlan`: sources, then the lr, grid and final phases, each through the run engine of `hf-l2sp search`
and `compare` (`tuning.engine.run_trials`, one-thread worker processes).

Finished runs are found by key under `<results>/runs/` and skipped, so the same command resumes a killed study.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..penalties.spec import grid_point
from .protocol import GRIDS, Setting, StudyPlan, default_value
from ..tuning.engine import configure_process, run_trials
from .runs import RunSpec, to_trial
from ..tuning.selection import choose
from .sources import prepare_setting

logger = logging.getLogger("hf_l2sp.study")
SELECTION_FILE = "selection.json"


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
        finals = [self.spec("final", setting, fisher, reg, size, seed,
                            selection[setting.name]["learning_rate"]["value"],
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
        """Run the specs that have no record yet (the run engine); return every spec's record."""
        records, progress = run_trials([to_trial(spec) for spec in specs], self.results_dir, self.workers,
                                       name=f"phase {name}", flush_denormal=self.flush_denormal)
        self.phases.append(PhaseReport(name, progress.total, progress.executed, progress.seconds))
        return records

    def _write_selection(self, selection: dict) -> None:
        path = self.results_dir / SELECTION_FILE
        path.write_text(json.dumps(selection, indent=1))


def _of(records: list[dict], setting: str) -> list[dict]:
    return [r for r in records if r["setting"] == setting]

