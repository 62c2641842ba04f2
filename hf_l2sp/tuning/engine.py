"""The run engine behind `search`, `compare` and `study`: one fine-tuning run from a recipe-like mapping of options,
and a resumable, parallel way to run many.

A run is a `Trial`: the options `hf-l2sp train` takes (a recipe's keys: model, data, every SPConfig field), a seed
(head initialisation and batch order) and a data seed (few-shot subset and validation carve). It trains on the
train split, evaluates on the validation split and, only when `evaluate_test` is set, on the test split; otherwise
the test split is never loaded into the run (its images are never decoded). Each finished run leaves a JSON record
under `<results>/runs/<key>.json`; a run whose record exists is never redone, so rerunning resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..pipeline.options import parse_options
from ..utils.files import write_text_atomically
from ..utils.errors import ConfigError

logger = logging.getLogger("hf_l2sp.tuning")

#: Options a trial always sets itself: where it writes, what it logs, and that it neither saves nor pushes.
RUN_CONTROL = {"eval_strategy": "no", "save_strategy": "no", "logging_strategy": "no", "report_to": "none",
               "load_best_model_at_end": False, "push_to_hub": False, "disable_tqdm": True}


@dataclass(frozen=True)
class Trial:
    options: tuple[tuple[str, Any], ...]  # sorted (option, value) pairs: a recipe
    seed: int
    data_seed: int
    evaluate_test: bool = False
    key: str = ""  # the record's name; default: a hash of everything above
    fields: tuple[tuple[str, Any], ...] = ()  # copied into the record (what the caller needs to read it back)

    @classmethod
    def make(cls, options: dict[str, Any], seed: int, data_seed: int | None = None, evaluate_test: bool = False,
             key: str = "", fields: dict[str, Any] | None = None) -> Trial:
        trial = cls(tuple(sorted(options.items())), seed, seed if data_seed is None else data_seed, evaluate_test,
                    key, tuple(sorted((fields or {}).items())))
        return trial if key else dataclasses.replace(trial, key=trial.digest())

    def digest(self) -> str:
        payload = json.dumps([self.options, self.seed, self.data_seed, self.evaluate_test], sort_keys=True,
                             default=str)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]

    def as_options(self) -> dict[str, Any]:
        return dict(self.options)


def record_path(results_dir: str | os.PathLike, trial: Trial) -> Path:
    return Path(results_dir) / "runs" / f"{trial.key}.json"


def run_trial(trial: Trial) -> dict:
    """Train and evaluate one trial; returns its record (validation metrics, test metrics if asked, drift)."""
    import torch
    from transformers import PrinterCallback

    from ..artefacts.drift import compute_drift
    from ..loading.data import NO_SPLIT
    from ..pipeline.finetune import prepare_run

    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="hf_l2sp_trial_"))
    try:
        options = {**trial.as_options(), **RUN_CONTROL, "output_dir": str(scratch), "seed": trial.seed,
                   "data_seed": trial.seed}
        if not trial.evaluate_test:
            options["test_split"] = NO_SPLIT  # selection never loads the test split
        model_args, data_args, args = parse_options(options)
        run = prepare_run(model_args, data_args, seed=trial.seed, data_seed=trial.data_seed)
        data, splits = run.data, run.splits
        if args.dataloader_drop_last and len(splits["train"]) < args.per_device_train_batch_size:
            raise ConfigError(f"{trial.key}: {len(splits['train'])} training images, fewer than one batch of "
                              f"{args.per_device_train_batch_size}; lower the batch size or raise the size per class.")
        head = _head_fingerprint(run.model)
        trainer = run.trainer(args)
        trainer.remove_callback(PrinterCallback)  # the engine prints one line per run
        trainer.train()
        train_seconds = time.perf_counter() - start
        args.dataloader_drop_last = False  # Trainer applies it to evaluation too: every image must be scored
        val = trainer.evaluate(splits["validation"], metric_key_prefix="val")
        test = trainer.evaluate(splits["test"], metric_key_prefix="test") if trial.evaluate_test else {}
        retention = _retention_record(trainer, run.retention)
        drift = compute_drift(trainer.model, trainer.sp_reference.tensors,
                              set(trainer.sp_parameters().anchored_names))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    counts = data.description["num_examples"]
    return {
        **dict(trial.fields), "key": trial.key, "seed": trial.seed, "data_seed": trial.data_seed,
        "regularizer": args.regularizer, "learning_rate": args.learning_rate,
        "train_images": counts["train"], "val_images": counts["validation"], "test_images": counts.get("test"),
        "train_rows": _rows_fingerprint(data.splits["train"]), "head_init": head,
        **{k: v for k, v in val.items() if k.startswith("val_") and isinstance(v, float)},
        "test_accuracy": test.get("test_accuracy"), "test_mean_per_class_accuracy":
            test.get("test_mean_per_class_accuracy"),
        "drift": drift["total"]["relative_distance"],
        "drift_stages": {row["stage"]: row["relative_distance"] for row in drift["stages"]},
        "drift_layers": [row["relative_distance"] for row in drift["layers"]],
        "drift_layer_names": [row["name"] for row in drift["layers"]],
        "drift_layer_penalised": [row["penalised"] for row in drift["layers"]],
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(), **retention,
    }


def _retention_record(trainer, retention) -> dict:
    """The retention set's forgetting at the end of the run (`retention_dataset`), as search and compare read it."""
    from ..pipeline.finetune import RETENTION_SET

    if retention is None:
        return {}
    metrics = trainer.evaluate(retention, metric_key_prefix=f"eval_{RETENTION_SET}")
    measure = trainer.retention.measures[RETENTION_SET]
    return {"forgetting": metrics[f"eval_{RETENTION_SET}_forgetting"], "retention_measure": measure}


def _head_fingerprint(model) -> str:
    """A hash of the new head's initial weights: paired runs (same seed) must start from the same head."""
    from ..loading.model_parts import find_head_modules, head_parameter_names

    names = head_parameter_names(model, find_head_modules(model))
    digest = hashlib.sha1()
    for name, param in sorted(model.named_parameters()):
        if name in names:
            digest.update(param.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:12]


def _rows_fingerprint(ds) -> str:
    from ..loading.data import ROW

    return hashlib.sha1(json.dumps(sorted(ds[ROW])).encode()).hexdigest()[:12]


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(record, indent=1))  # a killed run leaves no record


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def configure_process(threads: int | None, flush_denormal: bool = True) -> None:
    """Thread count and denormal flushing for a run process; quiet libraries (the engine prints its own lines)."""
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


class RunsFailed(RuntimeError):
    """Some runs failed; each one's error (with its traceback) was logged when it happened."""


@dataclass
class Progress:
    name: str
    total: int
    executed: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def _execute(trial: Trial, results_dir: str, runner: Callable[[Trial], dict]) -> dict:
    record = runner(trial)
    write_record(record_path(results_dir, trial), record)
    return record


def run_trials(trials: Iterable[Trial], results_dir: str | os.PathLike, workers: int = 1, name: str = "runs",
               runner: Callable[[Trial], dict] | None = None,
               flush_denormal: bool = True) -> tuple[list[dict], Progress]:
    """Run the trials that have no record yet (on `workers` one-thread processes when > 1) and return every
    trial's record, in order. `runner` turns a trial into its record (default: `run_trial`). Raises once all have
    been tried if any failed; finished runs are kept."""
    trials = list(trials)
    runner = runner or run_trial
    start = time.perf_counter()
    pending = [t for t in trials if read_record(record_path(results_dir, t)) is None]
    progress = Progress(name, len(trials))
    if pending:
        logger.info("%s: %d runs, %d already done", name, len(trials), len(trials) - len(pending))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc=name, unit="run", disable=not pending)  # progress from Python too
    for done, (trial, outcome) in enumerate(_map(pending, str(results_dir), workers, runner, flush_denormal),
                                            start=1):
        bar.update(1)
        if isinstance(outcome, BaseException):
            progress.failures.append(f"{trial.key}: {type(outcome).__name__}: {outcome}")
            logger.error("run %s failed: %s", trial.key, outcome, exc_info=outcome)
            continue
        progress.executed += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(pending) - done)
        test = outcome.get("test_accuracy")
        bar.set_postfix_str(f"val {outcome['val_accuracy']:.3f}")
        logger.info("[%s %d/%d] %s val %.4f%s drift %.3g %.1fs (eta %.0f min)", name, done, len(pending), trial.key,
                    outcome["val_accuracy"], "" if test is None else f" test {test:.4f}", outcome["drift"] or 0.0,
                    outcome["wall_seconds"], eta / 60)
    bar.close()
    progress.seconds = time.perf_counter() - start
    if progress.failures:
        raise RunsFailed(f"{len(progress.failures)} run(s) of {name!r} failed (rerun the same command to retry "
                           "them; finished runs are kept):\n" + "\n".join(progress.failures[:10]))
    return [read_record(record_path(results_dir, t)) for t in trials], progress


def _map(trials: list[Trial], results_dir: str, workers: int, runner, flush_denormal: bool):
    if not trials:
        return
    if workers <= 1:
        for trial in trials:
            try:
                yield trial, _execute(trial, results_dir, runner)
            except Exception as err:  # recorded and reported once every trial has been tried
                yield trial, err
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=configure_process,
                             initargs=(1, flush_denormal)) as pool:
        futures = {pool.submit(_execute, trial, results_dir, runner): trial for trial in trials}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if error is not None else future.result()
