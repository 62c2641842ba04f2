"""What a resume and a save say is true: Trainer's own words for a missing checkpoint, a WARNING when the optimizer's
or scheduler's state stays behind, no false WARNING under ZeRO-3's partitioned anchor, no card that points at weights
a folder does not hold."""

import logging
import math
import os

import pytest

from hf_l2sp import SPTrainer
from hf_l2sp.anchor.reference import FlatPartition, Reference
from hf_l2sp.anchor.resume import holds_checkpoint_weights
from hf_l2sp.loading.checkpoint_layout import parameter_layouts
from hf_l2sp.loading.model_parts import base_prefix, find_head_modules

from .helpers import sp_config, tensor_dataset, timm_classifier


def trained(tmp_path, **overrides):
    args = sp_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, **overrides)
    trainer = SPTrainer(model=timm_classifier(), args=args, train_dataset=tensor_dataset(8))
    trainer.train()
    return trainer


def test_missing_checkpoints_are_refused_in_trainers_own_words(tmp_path):
    trainer = SPTrainer(model=timm_classifier(), args=sp_config(tmp_path), train_dataset=tensor_dataset(8))
    with pytest.raises(ValueError, match=r"^Can't find a valid checkpoint at .*nowhere"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"^No valid checkpoint found in output directory \(.*out\)"):
        trainer.train(resume_from_checkpoint=True)


def test_a_resume_that_leaves_the_optimizer_or_scheduler_behind_says_so(tmp_path, caplog):
    trained(tmp_path)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    resume = SPTrainer(model=timm_classifier(), args=sp_config(tmp_path, max_steps=2, save_strategy="no"),
                       train_dataset=tensor_dataset(8))
    with caplog.at_level(logging.WARNING, logger="hf_l2sp"):
        resume.train(resume_from_checkpoint=str(checkpoint))
    assert "resuming from" not in caplog.text  # a complete checkpoint: nothing to say
    os.remove(checkpoint / "optimizer.pt")
    os.remove(checkpoint / "scheduler.pt")
    (checkpoint / "global_step1").mkdir()  # as DeepSpeed leaves it: its optimizer state in there
    with caplog.at_level(logging.WARNING, logger="hf_l2sp"):
        resume.train(resume_from_checkpoint=str(checkpoint))
    lines = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "without the optimizer's state (its optimizer state is DeepSpeed's, in global_step1/" in lines[0]
    assert "and the scheduler's state" in lines[0] and "fresh optimizer and scheduler" in lines[0]


def test_a_zero3_rank_compares_its_partition_of_the_anchor_with_the_checkpoint(tmp_path):
    """ZeRO-3 keeps of each anchor one flat part per rank: the resume check compares that part with the same part
    of the checkpoint's weights (it compared the part with the whole tensor, and warned falsely)."""
    model = timm_classifier()
    model.save_pretrained(tmp_path / "checkpoint")
    for rank in (0, 1):
        reference = Reference.snapshot(model, find_head_modules(model))
        parts = {}
        for name, tensor in reference.tensors.items():
            size = math.ceil(tensor.numel() / 2)
            start = rank * size
            parts[name] = FlatPartition(tuple(tensor.shape), start, size, max(0, min(size, tensor.numel() - start)))
        reference.keep_partitions(parts)
        assert holds_checkpoint_weights(str(tmp_path / "checkpoint"), reference, parameter_layouts(model),
                                        base_prefix(model))
        next(iter(reference.tensors.values())).add_(1.0)  # another model's values: not the checkpoint's
        assert not holds_checkpoint_weights(str(tmp_path / "checkpoint"), reference, parameter_layouts(model),
                                            base_prefix(model))


def test_a_folder_without_weights_gets_no_card_that_claims_them(tmp_path):
    trainer = trained(tmp_path)
    trainer.save_model()
    assert "from_pretrained(" in (tmp_path / "out" / "README.md").read_text()
    empty = tmp_path / "no-weights"
    trainer.write_artefacts(str(empty))
    card = (empty / "README.md").read_text()
    assert "from_pretrained(" not in card and "timm.create_model(" not in card
    assert "This folder holds no weights file" in card
    partitions = tmp_path / "zero3"
    (partitions / "global_step2").mkdir(parents=True)
    trainer.state.global_step += 1  # artefacts are written once per folder and step
    trainer.write_artefacts(str(partitions))
    card = (partitions / "README.md").read_text()
    assert "from_pretrained(" not in card and "python zero_to_fp32.py . consolidated" in card
