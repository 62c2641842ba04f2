"""estimate_fisher against brute-force autograd loops, its Monte-Carlo behaviour, storage and use in training."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_l2sp import FisherDiagonal, SPTrainer, load_fisher, save_fisher
from hf_l2sp.anchor.fisher import estimate_fisher

from .helpers import sp_config, tensor_dataset, timm_classifier

ROOT = Path(__file__).resolve().parents[1]


def tiny_source(seed=0, classes=5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, classes))
    with torch.no_grad():  # non-trivial running statistics, to see that eval mode uses them
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[5].weight.mul_(3)
    return model.eval()


def batches(n=12, batch=4, seed=0, classes=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return [{"pixel_values": x[i:i + batch], "labels": y[i:i + batch]} for i in range(0, n, batch)]


def brute_force(model, data, mode):
    """One backward pass per (sample, class) with plain autograd."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    m = 0
    for batch in data:
        for xi, yi in zip(batch["pixel_values"], batch["labels"]):
            logp = model(xi[None]).log_softmax(-1)[0]
            classes = range(len(logp)) if mode == "exact" else [int(yi)]
            for k in classes:
                model.zero_grad()
                logp[k].backward(retain_graph=True)
                weight = logp[k].exp().item() if mode == "exact" else 1.0
                for n, p in model.named_parameters():
                    total[n] += weight * p.grad ** 2
            m += 1
    return {n: t / m for n, t in total.items()}


def assert_fisher_close(estimate, expected, rtol=1e-5, atol_share=1e-9):
    """Equal to rtol, entries below atol_share x the tensor's largest entry compared absolutely (fp32 rounding)."""
    assert estimate.tensors.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(estimate.tensors[name], value, rtol=rtol,
                                   atol=atol_share * value.abs().max().item())


@pytest.mark.parametrize("method", ["hooks", "vmap"])
@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_matches_the_per_sample_autograd_loop(mode, method):
    model = tiny_source()
    fisher = estimate_fisher(model, batches(), mode, chunk_size=3, class_chunk=2, method=method)
    assert_fisher_close(fisher, brute_force(model, batches(), mode))
    assert fisher.metadata["mode"] == mode and fisher.metadata["num_samples"] == "12"
    assert fisher.metadata["method"] == method


@pytest.mark.parametrize("architecture", ["test_resnet", "test_efficientnet", "tf_efficientnet_lite0"])
def test_per_layer_rules_on_real_timm_networks(architecture):
    """In-place activations, depthwise and grouped convs, squeeze-excite, BatchNormAct2d and TF 'same' padding."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(architecture, num_classes=3).eval()
    data = [{"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 2])}]
    fisher = estimate_fisher(model, data, "exact", method="auto")
    assert fisher.metadata["method"] == "hooks"
    assert_fisher_close(fisher, brute_force(model, data, "exact"), rtol=1e-4, atol_share=1e-6)


class TokenMixer(nn.Module):
    """Conv stem, then a Linear applied to every spatial token (per-sample gradients summed over tokens)."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem, self.mix, self.head = nn.Conv2d(3, 6, 3, stride=2), nn.Linear(6, 5), nn.Linear(5, classes)

    def forward(self, x):
        tokens = self.stem(x).flatten(2).transpose(1, 2)  # (B, 9, 6)
        return self.head(torch.tanh(self.mix(tokens)).mean(1))


@pytest.mark.parametrize("model_fn", [lambda: tiny_source(classes=5), lambda: TokenMixer()], ids=["conv", "tokens"])
def test_gram_route_equals_the_direct_route_and_the_loop(model_fn, monkeypatch):
    """Layers with few output positions expand the square (per_sample.py); both routes must give the loop's values."""
    from hf_l2sp.anchor import per_sample

    torch.manual_seed(0)
    model = model_fn().eval()
    data = batches(n=6, batch=3)
    routed = []
    finish = per_sample.SquaredGradAccumulator.finish

    def spy(self):
        routed.extend(self._gram)
        return finish(self)

    monkeypatch.setattr(per_sample.SquaredGradAccumulator, "finish", spy)
    monkeypatch.setattr(per_sample, "_SQUARING_COST", 1000)  # every layer small enough takes the Gram route
    gram = estimate_fisher(model, data, "exact", method="hooks")
    assert routed, "no layer took the Gram route"
    routed.clear()
    monkeypatch.setattr(per_sample, "GRAM_BUDGET", 0)  # nothing fits: every layer forms per-sample gradients
    direct = estimate_fisher(model, data, "exact", method="hooks")
    assert not routed
    loop = brute_force(model, data, "exact")
    assert_fisher_close(gram, loop)
    assert_fisher_close(direct, loop)


def test_chunking_and_batching_change_nothing():
    model = tiny_source()
    reference = estimate_fisher(model, batches(batch=12), "exact", chunk_size=12, class_chunk=5)
    for chunk, class_chunk, batch in [(1, 1, 1), (5, 3, 4), (2, 64, 6)]:
        other = estimate_fisher(model, batches(batch=batch), "exact", chunk_size=chunk, class_chunk=class_chunk)
        assert_fisher_close(other, reference.tensors)


def test_batchnorm_stays_in_eval_mode_and_untouched():
    model = tiny_source().train()
    stats = model[1].running_mean.clone()
    fisher = estimate_fisher(model, batches(), "exact")
    assert model.training and torch.equal(model[1].running_mean, stats)  # mode restored, statistics not updated
    assert_fisher_close(fisher, brute_force(tiny_source().eval(), batches(), "exact"))


def test_sampled_is_an_unbiased_estimate_of_exact():
    """The trace of the sampled estimate is within 5 standard errors of the exact trace, and the same test
    rejects labels drawn from the wrong (uniform) distribution: it has the power to fail."""
    model = tiny_source(classes=4)
    data = batches(n=8, classes=4)
    exact = sum(t.sum() for t in estimate_fisher(model, data, "exact").tensors.values()).item()
    draws = 400
    runs = [sum(t.sum() for t in estimate_fisher(model, data, "sampled", draws=draws,
                                                 generator=torch.Generator().manual_seed(s)).tensors.values()).item()
            for s in range(8)]
    mean = sum(runs) / len(runs)
    stderr = math.sqrt(sum((r - mean) ** 2 for r in runs) / (len(runs) - 1) / len(runs))
    assert abs(mean - exact) < 5 * stderr + 1e-9
    assert stderr < 0.05 * exact  # the estimate is tight enough for the test to mean something
    uniform = [{"pixel_values": b["pixel_values"].repeat_interleave(100, 0),
                "labels": torch.arange(4).repeat(len(b["pixel_values"]) * 25)} for b in data]
    wrong = sum(t.sum() for t in estimate_fisher(model, uniform, "empirical").tensors.values()).item()
    assert abs(wrong - exact) > 5 * stderr


def test_timm_wrapper_keys_are_checkpoint_names_and_round_trip(tmp_path):
    model = timm_classifier("test_resnet", num_labels=4)
    data = [{"pixel_values": torch.randn(3, 3, 32, 32)}]
    fisher = estimate_fisher(model, data, "sampled", draws=2, metadata={"source_model": "test_resnet"},
                             generator=torch.Generator().manual_seed(0))
    assert "fc.weight" in fisher.tensors and not any(k.startswith("timm_model.") for k in fisher.tensors)
    path = save_fisher(fisher, tmp_path)
    loaded = load_fisher(str(tmp_path))
    assert path.name == "fisher.safetensors" and loaded.metadata["source_model"] == "test_resnet"
    assert loaded.metadata["mode"] == "sampled" and loaded.metadata["draws"] == "2"
    for k, v in fisher.tensors.items():
        assert torch.equal(loaded.tensors[k], v)


def test_normalisation_and_frozen_parameters():
    model = tiny_source()
    model[0].weight.requires_grad_(False)
    fisher = estimate_fisher(model, batches(), "exact", normalize="mean")
    flat = torch.cat([t.flatten() for t in fisher.tensors.values()])
    assert flat.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert "0.weight" not in fisher.tensors and fisher.metadata["frozen_parameters_skipped"] == "0.weight"


@pytest.mark.parametrize("make, data, match", [
    (lambda: __import__("timm").create_model("test_resnet", num_classes=0), batches(),
     r"needs the source model with its classification head"),
    (tiny_source, [], "saw zero samples"),
    (tiny_source, batches(), "mode must be one of exact, sampled, empirical"),
])
def test_bad_input(make, data, match):
    mode = "fishy" if "mode must" in match else "exact"
    with pytest.raises(ValueError, match=match):
        estimate_fisher(make(), data, mode)


def test_num_samples_caps_the_estimate():
    fisher = estimate_fisher(tiny_source(), batches(n=12), "exact", num_samples=5)
    assert fisher.metadata["num_samples"] == "5"
    expected = brute_force(tiny_source(), [{"pixel_values": batches(n=12, batch=12)[0]["pixel_values"][:5],
                                            "labels": batches(n=12, batch=12)[0]["labels"][:5]}], "exact")
    assert_fisher_close(fisher, expected)


def test_unit_fisher_training_equals_l2_sp(tmp_path):
    """A short l2_sp_fisher run with F = 1 ends at exactly the weights of the same l2_sp run."""
    model = timm_classifier()
    ones = FisherDiagonal({k.removeprefix("timm_model."): torch.ones_like(v) for k, v in model.state_dict().items()
                           if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))})
    save_fisher(ones, tmp_path / "ones")
    finals = {}
    for name, extra in (("l2_sp", {}), ("l2_sp_fisher", {"sp_fisher": str(tmp_path / "ones")})):
        model = timm_classifier()
        args = sp_config(tmp_path / name, regularizer=name, sp_alpha=3.0, sp_include="all", max_steps=3, **extra)
        SPTrainer(model=model, args=args, train_dataset=tensor_dataset(12)).train()
        finals[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in finals["l2_sp"]:
        torch.testing.assert_close(finals["l2_sp_fisher"][n], finals["l2_sp"][n], rtol=1e-6, atol=1e-7)


def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 gloo ranks, each a shard of the batches, one all-reduce: the same Fisher as one process."""
    script = tmp_path / "fisher_ddp.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(ROOT)!r})
from tests.test_fisher import tiny_source, batches
from hf_l2sp import save_fisher
from hf_l2sp.anchor.fisher import estimate_fisher
dist.init_process_group("gloo")
fisher = estimate_fisher(tiny_source(), batches(n=12, batch=2), "exact", chunk_size=2)
if dist.get_rank() == 0:
    save_fisher(fisher, {str(tmp_path / "two")!r})
dist.barrier()  # every rank done before teardown (gloo aborts on a racing exit)
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_fisher(str(tmp_path / "two"))
    one = estimate_fisher(tiny_source(), batches(n=12, batch=2), "exact")
    assert two.metadata["num_samples"] == "12"
    assert_fisher_close(two, one.tensors)


def test_fisher_command_then_training_with_it(tmp_path, capsys):
    from hf_l2sp.cli import main

    from .helpers import save_timm_folder, write_parquet_repo

    save_timm_folder(tmp_path / "source", num_classes=6)
    write_parquet_repo(tmp_path / "data", splits={"train": 20, "test": 6})
    assert main(["fisher", "--model", str(tmp_path / "source"), "--dataset_name", str(tmp_path / "data"),
                 "--num_samples", "7", "--mode", "exact", "--image_size", "32", "--output",
                 str(tmp_path / "fisher"), "--device", "cpu", "--batch_size", "3"]) == 0
    fisher = load_fisher(str(tmp_path / "fisher"))
    assert fisher.metadata["num_samples"] == "7" and fisher.metadata["mode"] == "exact"
    assert fisher.tensors["fc.weight"].shape == (6, 96)  # the source head, 6 classes
    assert "/" not in fisher.metadata["source_model"].replace("local folder", "")
    flags = ["--model_name_or_path", str(tmp_path / "source"), "--dataset_name", str(tmp_path / "data"),
             "--output_dir", str(tmp_path / "out"), "--image_size", "32", "--max_steps", "2", "--use_cpu", "true",
             "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--optim", "sgd",
             "--regularizer", "l2_sp_fisher", "--sp_fisher", str(tmp_path / "fisher"), "--sp_alpha", "10",
             "--dataloader_num_workers", "0"]
    assert main(["train", *flags]) == 0
    out = tmp_path / "out"
    assert load_fisher(str(out)).tensors.keys() == fisher.tensors.keys()  # shipped beside the weights
    assert "Fisher diagonal" in (out / "README.md").read_text()

    other = tmp_path / "other"
    save_timm_folder(other, architecture="resnet10t", num_classes=6)
    assert main(["fisher", "--model", str(other), "--dataset_name", str(tmp_path / "data"), "--num_samples", "2",
                 "--image_size", "32", "--output", str(tmp_path / "fisher_other"), "--device", "cpu"]) == 0
    flags[flags.index(str(tmp_path / "fisher"))] = str(tmp_path / "fisher_other")
    flags[flags.index(str(tmp_path / "out"))] = str(tmp_path / "out2")
    assert main(["train", *flags]) == 2
    assert "does not match the model: " in capsys.readouterr().err


def test_round_off_below_zero_is_clamped_and_real_negatives_refused():
    """Issue 22g: a mean of squares computed by expanding the square can land at -1e-12; that is round-off."""
    fisher = FisherDiagonal({"a": torch.tensor([2.0, -1e-12, 0.5]), "b": torch.tensor([-3e-13])})
    assert float(fisher.tensors["a"].min()) == 0.0 and float(fisher.tensors["b"][0]) == 0.0
    with pytest.raises(ValueError, match="negative entries in: b"):
        FisherDiagonal({"a": torch.tensor([2.0]), "b": torch.tensor([-0.1])})


def test_fisher_command_on_the_readmes_offline_model(tmp_path, monkeypatch, capsys):
    """The exact command of issue 22g, which stopped on -1e-12 entries of blocks.5.2.conv_pw.weight."""
    from hf_l2sp.cli import main

    monkeypatch.setenv("HF_L2SP_CACHE", os.environ.get("HF_L2SP_CACHE", str(Path.home() / ".cache" / "hf_l2sp")))
    out = tmp_path / "fisher"
    assert main(["fisher", "--model", "hf_l2sp:efficientnet_lite0", "--dataset_name", "hf_l2sp:digits",
                 "--num_samples", "16", "--mode", "sampled", "--image_size", "64", "--output", str(out)]) == 0
    fisher = load_fisher(str(out))
    assert all(bool((t >= 0).all()) for t in fisher.tensors.values())
    assert sum(float(t.sum()) for t in fisher.tensors.values()) > 0
