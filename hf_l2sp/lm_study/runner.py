"""Runs an `LMStudyPlan`: heal the dequantised weights once (they become w0), measure w0, then train every method on
every seed through `SPTrainer`, measuring each end point (and WiSE-FT's mixtures of it with w0).

Each run's records are written to `<output>/runs/seed<k>/<method>.json` when it ends and found there by the next
invocation, so a killed study resumes where it stopped; the healed weights are cached beside the base checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from .data import StudyData
from .measure import distance, measure
from .plan import Budget, LMStudyPlan, Method
from .texts import Corpora

logger = logging.getLogger("hf_l2sp.lm_study")
START_FILE = "start.json"


def _trainer_args(output_dir: str, budget: Budget, learning_rate: float, seed: int, steps: int, **sp):
    from ..training.config import SPConfig

    return SPConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=budget.batch_size,
                    learning_rate=learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                    logging_steps=steps, save_strategy="no", eval_strategy="no", report_to="none", seed=seed,
                    data_seed=seed, disable_tqdm=True, use_cpu=True, **sp)


def _dataset(blocks: torch.Tensor):
    from datasets import Dataset

    rows = blocks.tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def train(model, blocks: torch.Tensor, args) -> float:
    from ..artefacts.trainer import SPTrainer

    trainer = SPTrainer(model=model, args=args, train_dataset=_dataset(blocks))
    began = time.perf_counter()
    trainer.train()
    return time.perf_counter() - began


class LMStudy:
    """`base`: a causal-LM checkpoint folder with its tokenizer; `corpora`: the texts; `cache`: where the healed
    weights are kept; `output`: the records."""

    def __init__(self, plan: LMStudyPlan, base: Path, corpora: Corpora, output: Path, cache: Path):
        from transformers import AutoTokenizer

        self.plan, self.base, self.output, self.cache = plan, Path(base), Path(output), Path(cache)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        self.data = StudyData.build(self.tokenizer, corpora, plan.budget)
        self.executed = 0

    # ---- w0 -------------------------------------------------------------------------------------------------

    def healed(self) -> Path:
        """The base weights after `heal_steps` of plain training on general text: the study's w0."""
        b = self.plan.budget
        folder = self.cache / f"healed-{b.heal_steps}x{b.batch_size}x{b.block}-lr{b.heal_learning_rate:g}"
        if (folder / "model.safetensors").exists():
            return folder
        model = self._load(self.base)
        if b.heal_steps:
            with tempfile.TemporaryDirectory() as tmp:
                args = _trainer_args(tmp, b, b.heal_learning_rate, 0, b.heal_steps, regularizer="none")
                seconds = train(model, self.data.heal_blocks(b), args)
            logger.info("Healed the base weights in %.0f s (%d steps on general text).", seconds, b.heal_steps)
        partial = folder.with_name(folder.name + ".partial")
        model.save_pretrained(str(partial))
        self.tokenizer.save_pretrained(str(partial))
        partial.rename(folder)
        return folder

    def _load(self, folder: Path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)

    # ---- the runs -------------------------------------------------------------------------------------------

    def run(self) -> list[dict]:
        self.output.mkdir(parents=True, exist_ok=True)
        w0_folder = self.healed()
        model = self._load(w0_folder)
        self.w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
        kl_blocks = self.plan.budget.kl_blocks
        self.start, self.start_logits = measure(model, self.data, kl_blocks, None)
        base_values = measure(self._load(self.base), self.data, kl_blocks, self.start_logits)[0]
        (self.output / START_FILE).write_text(json.dumps({"healed": self.start, "before_healing": base_values,
                                                          "budget": dataclasses.asdict(self.plan.budget)}, indent=1))
        del model
        records = []
        for seed in self.plan.seeds:
            for method in self.plan.methods:
                records.extend(self.run_one(method, seed, w0_folder))
        return records

    def run_one(self, method: Method, seed: int, w0_folder: Path) -> list[dict]:
        path = self.output / "runs" / f"seed{seed}" / f"{method.name}.json"
        if path.exists():
            return json.loads(path.read_text())
        b = self.plan.budget
        torch.manual_seed(seed)
        model = self._load(w0_folder)
        if method.lora_rank:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=method.lora_rank, lora_alpha=2 * method.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        blocks, replayed = self.data.training_blocks(method, seed, b)
        with tempfile.TemporaryDirectory() as tmp:
            args = _trainer_args(tmp, b, method.learning_rate, seed, b.steps, regularizer=method.regularizer,
                                 sp_alpha=method.alpha)
            seconds = train(model, blocks, args)
        common = {"seed": seed, "method": method.name, "family": method.family, "learning_rate": method.learning_rate,
                  "alpha": method.alpha, "lora_rank": method.lora_rank, "replay": replayed,
                  "tokens": b.steps * b.batch_size * b.block, "train_seconds": round(seconds, 1)}
        records = [self._record(model, common, mix=1.0)]
        if method.wise:
            records.extend(self._wise(model, common, method.wise))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(records, indent=1))
        partial.rename(path)
        self.executed += 1
        logger.info("seed %d %s: target %.4f, forgetting %.4f, KL %.4f (%.0f s)", seed, method.name,
                    records[0]["target_gain"], records[0]["forgetting"], records[0]["kl"], seconds)
        return records

    def _record(self, model, common: dict, mix: float) -> dict:
        values, _ = measure(model, self.data, self.plan.budget.kl_blocks, self.start_logits)
        record = dict(common, mix=mix, **values, distance=distance(model, self.w0))
        record["target_gain"] = self.start["target_loss"] - values["target_loss"]
        for name in self.data.retention:
            record[f"{name}_forgetting"] = values[f"{name}_loss"] - self.start[f"{name}_loss"]
        record["forgetting"] = sum(record[f"{n}_forgetting"] for n in self.data.retention) / len(self.data.retention)
        return record

    def _wise(self, model, common: dict, mixes: tuple[float, ...]) -> list[dict]:
        """WiSE-FT: w0 + m (w − w0) for each mixing weight m, measured in place; the end point is put back."""
        end = {name: p.detach().clone() for name, p in model.named_parameters()}
        records = []
        with torch.no_grad():
            for mix in mixes:
                for name, parameter in model.named_parameters():
                    parameter.copy_(torch.lerp(self.w0[name], end[name], mix))
                records.append(self._record(model, dict(common, family="wise", method=f"wise-of-{common['method']}"),
                                            mix=mix))
            for name, parameter in model.named_parameters():
                parameter.copy_(end[name])
        return records
