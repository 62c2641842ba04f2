"""Model cards: facts gathered from a training run, rendered offline through the Jinja template.

`card_facts(...)` collects plain values (and strips anything machine-specific: local paths, tokens, output
folders); `render_model_card(facts)` is pure and offline. The template lives in
`hf_l2sp/artefacts/templates/model_card.md` (also reachable as `model_cards/template.md`).
"""

from __future__ import annotations

import dataclasses
import re
from enum import Enum
from importlib import metadata
from importlib.resources import files
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..penalties.base import PAPER_CITATION
from ..penalties.registry import get_penalty_class
from ..utils.hub import is_hub_id, public_name

_PRIVATE_KEY = re.compile(r"token|_dir$|dir_|path|resume|^hub_|^push_to_hub|sp_reference|sp_fisher|deepspeed|"
                          r"run_name|fsdp_config|accelerator_config|trackio|project")
_DERIVED = {"do_eval", "greater_is_better", "dataloader_pin_memory", "report_to", "logging_strategy"}
PACKAGES = ("hf_l2sp", "torch", "transformers", "timm", "datasets", "accelerate", "huggingface_hub")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _field_defaults(cls) -> dict[str, Any]:
    """Declared defaults of a dataclass (no instance: building TrainingArguments resets accelerate's state)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {k: v.value if isinstance(v, Enum) else v for k, v in out.items()}


def non_default_hyperparameters(args) -> dict[str, Any]:
    """TrainingArguments/SPConfig values that differ from the declared defaults, minus machine-specific ones."""
    current, default = args.to_dict(), _field_defaults(type(args))
    out = {}
    for key in sorted(current):
        value = current[key]
        base = default.get(key)
        if _PRIVATE_KEY.search(key) or key in _DERIVED or key not in default or value == base or (
                not value and not base) or (value is not None and base is not None and str(value) == str(base)):
            continue
        if isinstance(value, str) and (value.startswith(("/", "~", "hf_")) or "token" in value.lower()):
            continue
        out[key] = value
    return out


def results_from_metrics(metrics: dict[str, float]) -> list[dict]:
    rows = []
    for prefix, split in (("eval", "validation"), ("test", "test")):
        for metric in ("accuracy", "top5_accuracy"):
            key = f"{prefix}_{metric}"
            if key in metrics:
                rows.append({"split": split, "metric": metric, "value": float(metrics[key])})
    return rows


def render_model_card(facts: dict[str, Any]) -> ModelCard:
    """Pure: a `huggingface_hub.ModelCard` from plain facts (see `card_facts`)."""
    dataset_id = facts.get("dataset_id")
    task = facts.get("task")
    eval_results = [
        EvalResult(task_type=task or "other", task_name=facts["task_text"].title(),
                   dataset_type=dataset_id or "custom", dataset_name=facts["dataset_display"],
                   dataset_split=row["split"], metric_type=row["metric"], metric_name=row["metric"],
                   metric_value=round(row["value"], 6))
        for row in facts["results"]
    ]
    card_data = ModelCardData(
        library_name="timm" if facts["is_timm"] else "transformers",
        pipeline_tag=task,
        base_model=facts.get("base_model_id"),
        datasets=[dataset_id] if dataset_id else None,
        tags=["hf_l2sp", "transfer-learning", *(f"regularizer:{p}" for p in facts["regularizer_name"].split("+")),
              *([task] if task else []),
              *(["timm"] if facts["is_timm"] else [])],
        model_name=facts["model_name"],
        eval_results=eval_results or None,
    )
    template = files("hf_l2sp") / "artefacts" / "templates" / "model_card.md"
    return ModelCard.from_template(card_data, template_str=template.read_text(), **facts)


def card_facts(*, model_name: str, repo_id: str, regularizer, sp_summary: dict[str, int], include: str,
               anchor_source: str, base_model: str | None, base_revision: str | None, is_timm: bool,
               data: dict | None, metrics: dict[str, float], drift: dict | None, hyperparameters: dict,
               fisher_source: str | None = None, features=(), label: str | None = None,
               task: str | None = "image-classification", new_tensors: str | None = None,
               stored_tensors: int | None = None, retention: dict | None = None,
               weights_missing: str | None = None) -> dict[str, Any]:
    """Everything the template needs, as plain JSON-able values with machine-specific details removed."""
    data = data or {}
    dataset = data.get("dataset")
    base_display = public_name(base_model)
    citations = [PAPER_CITATION]
    for part in (regularizer, *features):
        if part.citation and part.citation not in citations:
            citations.append(part.citation)
    label = label or regularizer.name
    return {
        "model_name": model_name,
        "repo_id": repo_id,
        "timm_name": f"hf-hub:{repo_id}" if is_hub_id(repo_id) else f"local-dir:{repo_id}",
        "base_model_id": base_model if is_hub_id(base_model) else None,
        "base_model_display": (base_display or "") + (f" @ {base_revision}" if base_revision and base_display else ""),
        "base_model_link": f"https://huggingface.co/{base_model}" if is_hub_id(base_model) else None,
        "dataset_id": dataset if is_hub_id(dataset) else None,
        "dataset_display": public_name(dataset) or "a user-provided dataset",
        "dataset_config": data.get("config"),
        "dataset_revision": data.get("revision"),
        "splits": data.get("splits"),  # None: datasets handed to the trainer, not loaded by name
        "num_examples": data.get("num_examples", {}),
        "num_classes": data.get("num_classes", "?"),
        "samples_per_class": data.get("max_train_samples_per_class"),
        "regularizer_name": label,
        "regularizer_title": " + ".join(get_penalty_class(part).title or part for part in label.split("+")),
        "formula": "\n".join([regularizer.formula, *(f.formula for f in features)]),
        "feature_rows": [{"name": f.name, "settings": ", ".join(f"{k}={v}" for k, v in f.config_dict().items()
                                                              if k != "name")} for f in features],
        "alpha": regularizer.alpha,
        "beta": regularizer.beta,
        "include_text": "weight matrices of conv, linear and embedding layers only (norm layers and biases free, "
                        "as in the paper)" if include == "weights" else "every trainable tensor",
        "task": task,
        "task_text": (task or "a new task").replace("-", " "),
        "is_image": task == "image-classification",
        "new_tensors": new_tensors,
        "anchor_source": anchor_source,
        "stored_tensors": stored_tensors,  # tensors in w0 (sp_config.json's count): anchored ones plus free ones
        "fisher_source": public_name(fisher_source),
        **sp_summary,
        "is_timm": is_timm,
        "results": results_from_metrics(metrics),
        "drift_stages": (drift or {}).get("stages", []),
        "drift_adapters": (drift or {}).get("adapters", []),
        "drift_plot": bool((drift or {}).get("plot")),
        "hyperparameters": hyperparameters,
        "retention": retention,  # forgetting.report.retention_summary, or None without retention sets
        # None, or why the folder has no weights ('deepspeed': ZeRO-3 partitions; 'none'): the card then says so
        "weights_missing": weights_missing,
        "versions": versions(),
        "citations": citations,
    }
