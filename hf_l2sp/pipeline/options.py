"""The options of a fine-tuning run (model, data, SPConfig) from a YAML recipe, a mapping, or a command line
(`--config recipe.yaml --field value`): what `hf-l2sp train`, `search`, `compare`, `study` and `demo` all read."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from importlib import resources

import yaml

from ..loading.data import DataArguments
from ..training.config import SPConfig
from ..utils.errors import ConfigError
from .arguments import make_parser, refuse_unknown


@dataclass
class ModelArguments:
    """Which pretrained network to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "timm Hub id (timm/resnet50.a1_in1k), timm name with tag, local timm or transformers "
                          "folder, transformers Hub id, or hf_l2sp:efficientnet_lite0 (offline ImageNet weights)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache folder for the model files."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (files there may be replaced)."}
    )


#: The option groups of a fine-tuning run, in the order `parse_options` returns them.
ARGUMENT_TYPES = (ModelArguments, DataArguments, SPConfig)


class RecipeError(ConfigError):
    """A recipe file that cannot be used as is."""


def packaged_recipes() -> dict[str, Path]:
    """Recipes that ship inside the package (hf_l2sp/recipes), by name without `.yaml`."""
    folder = Path(str(resources.files("hf_l2sp") / "recipes"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def resolve_recipe(path: str) -> Path:
    """A recipe file: a path, or the name of a packaged recipe (`offline_lite0_digits_l2sp`, `.yaml` optional)."""
    file = Path(path)
    if file.is_file():
        return file
    packaged = packaged_recipes()
    name = file.name.removesuffix(".yaml") if file.parent == Path(".") else None
    if name in packaged:
        return packaged[name]
    raise RecipeError(f"Recipe {path!r} does not exist: neither a file nor a packaged recipe "
                      f"({', '.join(packaged)}).")


def option_names(dataclass_types: tuple[type, ...]) -> set[str]:
    return {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}


def unknown_options(options: dict, dataclass_types: tuple[type, ...]) -> list[str]:
    return sorted(set(options) - option_names(dataclass_types))


def read_recipe(path: str, dataclass_types: tuple[type, ...]) -> dict:
    file = resolve_recipe(path)
    recipe = yaml.safe_load(file.read_text()) or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path!r} must be a mapping of option: value, not {type(recipe).__name__}.")
    unknown = unknown_options(recipe, dataclass_types)
    if unknown:
        raise RecipeError(f"Recipe {path!r} has keys no option knows: {', '.join(unknown)}. "
                          "See `hf-l2sp train --help` for the valid options.")
    return recipe


def parse_with_recipe(dataclass_types: tuple[type, ...], argv: list[str] | None, prog: str, description: str):
    """Instances of `dataclass_types`, from the YAML given by --config (defaults) and the flags (overrides)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = make_parser(dataclass_types, prog, description)
    if known.config:
        parser.set_defaults(**read_recipe(known.config, dataclass_types))
    refuse_unknown(parser, rest)
    outputs = parser.parse_args_into_dataclasses(args=rest)
    return outputs[: len(dataclass_types)]


_UNSET = object()


def options_from_argv(dataclass_types: tuple[type, ...], argv: list[str], prog: str) -> dict:
    """The options a command line gives, as a recipe-like mapping: the --config recipe, then the flags given.

    Only options actually given appear (typed as the train command types them), so the mapping can be written
    back as a recipe (`best.yaml`) that `hf-l2sp train --config` runs as is.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    options = dict(read_recipe(known.config, dataclass_types)) if known.config else {}
    parser = make_parser(dataclass_types, prog, "")
    parser.set_defaults(**{name: _UNSET for name in option_names(dataclass_types)})
    given, extra = parser.parse_known_args(rest)
    if extra:
        raise RecipeError(f"Unknown argument(s) {' '.join(extra)}; see `{prog} --help`.")
    options.update({k: v for k, v in vars(given).items() if v is not _UNSET and k not in ("config",
                                                                                          "accelerate_config")})
    return options


def parse_options(options: dict) -> tuple[ModelArguments, DataArguments, SPConfig]:
    """(ModelArguments, DataArguments, SPConfig) from a recipe-like mapping, typed as `hf-l2sp train` types them."""
    unknown = unknown_options(options, ARGUMENT_TYPES)
    if unknown:
        raise ConfigError(f"Unknown option(s) {', '.join(unknown)}; see `hf-l2sp train --help` for the valid ones.")
    parser = make_parser(ARGUMENT_TYPES, "hf_l2sp", "")
    parser.set_defaults(**options)
    return parser.parse_args_into_dataclasses(args=[])[: len(ARGUMENT_TYPES)]


def load_recipe(name_or_path: str) -> dict:
    """A recipe as the options mapping `search`, `compare` and `hf-l2sp train --config` take (a path, or a
    packaged recipe's name such as 'offline_lite0_digits_l2sp')."""
    return dict(read_recipe(name_or_path, ARGUMENT_TYPES))
