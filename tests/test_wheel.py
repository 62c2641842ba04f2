"""What `pip install hf_l2sp` gives: the wheel alone, installed outside the checkout, trains, saves, loads and runs
the demo; without matplotlib (a core install) saving still works and only the drift plot is skipped."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import hf_l2sp
assert hf_l2sp.__file__.startswith({site!r}), hf_l2sp.__file__  # the wheel's copy, not the checkout
try:
    import matplotlib
    raise SystemExit("matplotlib should be blocked in this test")
except ImportError:
    pass
from hf_l2sp.cli import main
code = main(["train", "--config", "offline_lite0_digits_l2sp", "--output_dir", {run!r}, "--max_steps", "2",
             "--max_train_samples_per_class", "2", "--eval_strategy", "no", "--save_strategy", "no",
             "--load_best_model_at_end", "false", "--disable_tqdm", "true"])
assert code == 0, code
from transformers import AutoModelForImageClassification, pipeline
model = AutoModelForImageClassification.from_pretrained({run!r})
classify = pipeline("image-classification", model={run!r})
from PIL import Image
print("PIPELINE", json.dumps(classify(Image.new("RGB", (8, 8)))[:1]))
assert main(["demo", "--output_dir", {demo!r}, "--samples_per_class", "1", "--epochs", "1", "--seeds", "0"]) == 0
"""


def test_the_wheel_alone_trains_saves_loads_and_runs_the_demo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("hf_l2sp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("hf_l2sp/recipes/offline_lite0_digits_l2sp.yaml", "hf_l2sp/recipes/offline_lite0_digits_l2.yaml",
                    "hf_l2sp/artefacts/templates/model_card.md", "hf_l2sp/accelerate_configs/fsdp2.yaml",
                    "hf_l2sp/loading/metric_modules/top_k_accuracy/top_k_accuracy.py",
                    "hf_l2sp/loading/metric_modules/per_class_accuracy/per_class_accuracy.py"):
        assert shipped in names, shipped
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    blocker = tmp_path / "no_matplotlib" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed (blocked by the test)')\n")
    run, demo = tmp_path / "run", tmp_path / "demo"
    script = SCRIPT.format(site=str(site), run=str(run), demo=str(demo))
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{blocker.parent}", "HF_L2SP_CACHE": str(tmp_path / "c")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run / "model.safetensors").is_file() and (run / "drift.json").is_file()
    assert not (run / "drift.png").exists() and "plot" not in json.loads((run / "drift.json").read_text())
    card = (run / "README.md").read_text()
    assert "drift.png" not in card and "## Drift from the starting point" in card
    assert "matplotlib is not installed; drift.png skipped" in done.stdout + done.stderr
    assert "PIPELINE" in done.stdout
    assert "EfficientNet-Lite0 (ImageNet) -> digits" in done.stdout
    for regularizer in ("l2_sp", "l2"):
        assert (demo / "seed0" / regularizer / "model.safetensors").is_file()
