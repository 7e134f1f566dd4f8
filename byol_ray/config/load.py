"""Building a checked `Config`: from a plain dict, from a YAML file and `key=value` overrides.

`load_config` applies the layers in their order (dataclass defaults, the YAML file, the command-line
overrides) and validates the result once; the package docstring (``__init__.py``) lists every layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .coerce import build, set_dotted
from .schema import FREE_FORM, ConfigError, ConfigFields
from .validate import validate


class Config(ConfigFields):
    """The whole configuration: the fields of `ConfigFields` (``schema.py``), built from plain data and
    validated. Build one with `load_config`, `Config.from_dict` or `Config.replace`; `Config()` is the
    defaults, unchecked."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Config:
        """The config of a plain mapping of sections (keys left out keep their defaults), typed and validated."""
        cfg = build(cls, d or {}, "")
        validate(cfg)
        return cfg

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with dotted-key overrides applied."""
        d = self.to_dict()
        for k, v in overrides.items():
            set_dotted(d, k, v)
        return Config.from_dict(d)

    def override(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with a layer above the YAML file applied (the command line's, a sweep's):
        like `replace`, and each key also leaves the `on_gpu` recipe, so the layer wins on GPUs too."""
        d = self.to_dict()
        for k, v in overrides.items():
            _set_over_recipe(d, k, v)
        return Config.from_dict(d)


def _set_over_recipe(d: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key of a config's dict and drop it from its GPU recipe: a layer above the file wins."""
    set_dotted(d, key, value)
    if isinstance(d.get("on_gpu"), dict):
        d["on_gpu"].pop(key, None)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.epochs=3' -> ('optim.epochs', 3); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what a YAML syntax error is, in one line ('line 3, column 1: found character ...'), with
    the fix for the one mistake YAML's own words do not explain: a tab."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces only: replace the tab with spaces)"
    return where + problem


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of sections in a YAML config file, or a ConfigError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass a YAML file such as experiments/fmnist.yaml")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file {p} is not valid YAML at {yaml_problem(e)}. Fix it there; "
            f"experiments/fmnist.yaml shows the expected layout."
        ) from None
    if d is None:
        # Not the defaults in silence: those are the paper's 100-epoch ImageNet-length schedule.
        raise ConfigError(
            f"config file {p} is empty. Put the sections to change in it (data:, model:, optim:, "
            f"...; experiments/fmnist.yaml is an example), or leave --config out to run the defaults."
        )
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
    return d


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, validated once."""
    d: dict[str, Any] = Config().to_dict()
    if path:
        _merge(d, load_yaml(path), "")
    for o in overrides or []:
        _set_over_recipe(d, *parse_override(o))  # a key given on the command line wins over the GPU recipe
    return Config.from_dict(d)


def _merge(base: dict[str, Any], new: dict[str, Any], prefix: str) -> None:
    """`new` (a YAML file's mapping) over `base` in place, section by section; a FREE_FORM mapping whole."""
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"unknown config key {prefix}{k}; valid keys: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and isinstance(v, dict) and f"{prefix}{k}" not in FREE_FORM:
            _merge(base[k], v, f"{prefix}{k}.")
        else:
            base[k] = v
