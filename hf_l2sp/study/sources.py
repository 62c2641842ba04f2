"""What a setting needs before its runs: the source network (pretrained here for near transfer) and its Fisher file.

Both go through the library's run pipeline (`pipeline.finetune` for pretraining, `pipeline.fisher` for the
Fisher), and both are skipped when their output is already complete, so an interrupted study resumes where it
stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from .protocol import Setting

logger = logging.getLogger("hf_l2sp.study")
DONE = ".complete"


def prepare_setting(setting: Setting, results_dir: Path) -> tuple[Setting, str]:
    """The setting with its `model` filled in, and the path of its Fisher file (built if missing)."""
    folder = results_dir / "sources" / setting.name
    if setting.pretrain is not None:
        setting = replace(setting, model=str(pretrain_source(setting, folder / "source_model")))
    return setting, str(estimate_source_fisher(setting, folder / "fisher.safetensors"))


def pretrain_source(setting: Setting, output: Path) -> Path:
    """Train `setting.pretrain.architecture` from random init on the source dataset with `hf-l2sp train`."""
    if (output / DONE).is_file():
        return output
    import timm
    import torch
    from timm.models import save_for_hf

    from ..loading.data import DataArguments, load_image_dataset
    from ..pipeline.finetune import finetune
    from ..pipeline.options import parse_options

    spec = setting.pretrain
    shutil.rmtree(output, ignore_errors=True)
    init = output.parent / "source_init"
    shutil.rmtree(init, ignore_errors=True)
    labels = load_image_dataset(DataArguments(dataset_name=spec.dataset)).label_names
    torch.manual_seed(0)
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=len(labels))
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": labels,
                            "input_size": (3, setting.image_size, setting.image_size)}
    save_for_hf(model, str(init), safe_serialization=True)
    config = json.loads((init / "config.json").read_text())
    config.pop("model_args", None)
    (init / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("Pretraining the near-transfer source %s on %s", spec.architecture, spec.dataset)
    options = {"model_name_or_path": str(init), "dataset_name": spec.dataset, "regularizer": "none",
               "image_size": setting.image_size, "augmentation": "none", "output_dir": str(output), "optim": "sgd",
               "optim_args": "momentum=0.9", "learning_rate": spec.learning_rate, "lr_scheduler_type": "cosine",
               "warmup_steps": 20, "num_train_epochs": spec.epochs, "per_device_train_batch_size": 32,
               "per_device_eval_batch_size": 256, "weight_decay": 0.0, "sp_alpha": 0.0, "sp_beta": 0.0,
               "eval_strategy": "no", "save_strategy": "no", "logging_steps": 50, "report_to": "none",
               "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0}
    metrics = finetune(*parse_options(options))
    (output / "source_metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(init, ignore_errors=True)
    (output / DONE).write_text("ok\n")
    return output


def estimate_source_fisher(setting: Setting, output: Path) -> Path:
    """The source model's Fisher diagonal (normalised to mean 1) on the setting's Fisher images (train split)."""
    if output.is_file():
        return output
    from ..loading.data import DataArguments
    from ..pipeline.fisher import FisherArguments, estimate_fisher_file

    plan = setting.fisher
    logger.info("Estimating the %s Fisher of %s on %s", plan.mode, setting.model, plan.dataset)
    # save_fisher writes atomically: a killed study never leaves a partial file under the final name
    estimate_fisher_file(FisherArguments(model=setting.model, output=str(output), mode=plan.mode,
                                         num_samples=plan.num_samples, draws=plan.draws, normalize="mean",
                                         device="cpu"),
                         DataArguments(dataset_name=plan.dataset, train_split="train", image_size=setting.image_size))
    return output


def source_summary(results_dir: Path, setting: Setting) -> dict:
    """Source-model facts for the report (the near source's own test accuracy on digits 0-4)."""
    path = results_dir / "sources" / setting.name / "source_model" / "source_metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    return {k: metrics[k] for k in ("test_accuracy", "eval_accuracy") if k in metrics}
