"""Estimating a source model's Fisher diagonal from options (`hf-l2sp fisher`, the study's sources)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from datasets import DatasetDict
from torch.utils.data import DataLoader

from ..anchor.fisher import MODES, NORMALIZATIONS, estimate_fisher
from ..anchor.fisher_io import save_fisher
from ..loading.data import DataArguments, load_image_dataset
from ..loading.models import data_config_of, load_source_classifier
from ..loading.transforms import build_transforms, collate_images, with_transforms
from ..utils.hub import public_name
from ..utils.errors import ConfigError


@dataclass
class FisherArguments:
    """How to estimate the Fisher diagonal."""

    model: str | None = field(default=None, metadata={"help": "Source classifier with its own head (Hub id, folder)."})
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    output: str | None = field(default=None, metadata={"help": "Output file (.safetensors) or folder."})
    mode: str = field(default="sampled", metadata={"help": f"One of {', '.join(MODES)} (exact: all classes)."})
    num_samples: int = field(default=1000, metadata={"help": "Images used (m), drawn with the seed."})
    draws: int = field(default=1, metadata={"help": "Labels sampled per image (mode=sampled)."})
    batch_size: int = field(default=32, metadata={"help": "Images per data-loader batch."})
    chunk_size: int = field(default=8, metadata={"help": "Images per vectorised per-sample gradient call."})
    class_chunk: int = field(default=64, metadata={"help": "Classes per Jacobian block (mode=exact)."})
    normalize: str = field(default="none", metadata={"help": f"One of {', '.join(NORMALIZATIONS)} (raw by default)."})
    seed: int = field(default=0, metadata={"help": "Seed for the sample subset and the sampled labels."})
    device: str | None = field(default=None, metadata={"help": "Device; default: accelerate's (cuda if available)."})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}.")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1; got {self.num_samples}.")



def estimate_fisher_file(options: FisherArguments, data_args: DataArguments):
    """Estimate and write the Fisher diagonal (on the main process); returns the path written (None elsewhere)."""
    if not options.model or not options.output:
        raise ConfigError("--model and --output are required.")
    from accelerate import PartialState

    state = PartialState()  # joins the process group under accelerate launch / torchrun
    device = torch.device(options.device) if options.device else state.device
    model, report = load_source_classifier(options.model, options.model_revision)
    model.to(device)
    data = load_image_dataset(data_args, seed=options.seed)
    transforms = build_transforms(data_config_of(model), "none", data_args.image_size)
    train = data.splits["train"].shuffle(seed=options.seed)
    train = train.select(range(min(options.num_samples, len(train))))
    split = with_transforms(replace(data, splits=DatasetDict({"train": train})), transforms.train,
                            transforms.eval)["train"]
    loader = DataLoader(split, batch_size=options.batch_size, collate_fn=collate_images)
    generator = torch.Generator().manual_seed(options.seed + state.process_index)
    fisher = estimate_fisher(
        model, loader, options.mode, num_samples=options.num_samples, draws=options.draws,
        chunk_size=options.chunk_size, class_chunk=options.class_chunk, generator=generator,
        normalize=options.normalize, progress=state.is_main_process,
        metadata={"source_model": public_name(options.model), "source_revision": options.model_revision or "",
                  "data": f"{public_name(data_args.dataset_name)} split {data_args.train_split}"
                          f"{' config ' + data_args.dataset_config_name if data_args.dataset_config_name else ''}",
                  "world_size": state.num_processes},
    )
    if not state.is_main_process:
        return None
    path = save_fisher(fisher, options.output)
    print(f"Fisher diagonal ({options.mode}, m={fisher.metadata['num_samples']}) of {report.architecture} "
          f"written to {path}")
    return path
