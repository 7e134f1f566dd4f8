"""Sweep files: which ablation, which variants, how many seeds, and the paper's number for each row.

A sweep file (``experiments/sweeps/<preset>.yaml``, or any YAML of the same shape)::

    name: tau                          # the sweep's name: MLflow parent run, Tune experiment
    ablation: target decay rate tau    # what the table is of
    base_config: ../sweep_small.yaml   # the training config every trial starts from (relative to this file)
    overrides: {optim.epochs: 3}       # applied to every trial
    seeds: 3                           # or a list: [0, 1, 2]
    baseline: cosine                   # the row every delta is measured against
    paper_baseline: 72.5               # the paper's number for the baseline row
    asha: {enabled: false, metric: online_probe_acc, grace_epochs: 1, reduction_factor: 2}
    steps: 1200                        # optional: the baseline's optimiser steps, for every trial
    hold: steps                        # or images: each variant's steps = steps x baseline batch / its batch
    variants:
      - {name: "tau=0", set: {optim.tau_base: 0.0, optim.tau_schedule: constant}, paper: 0.3}

Without `steps:` the sweep plans its steps once, before the trials: from one warm-up when the trials have
a time budget, else from the baseline's `optim.epochs` (``distributed/sweep_plan.py``). Every trial then
trains exactly its share of that one figure, so rows differ only by their variant.

Everything is checked when the file is loaded, including every trial's full config, so a typo fails
in a second with the variant's name in the message, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, load_config, parse_override, yaml_problem
from .errors import UserError

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "sweeps"
_TOP_KEYS = {
    "name",
    "ablation",
    "base_config",
    "overrides",
    "seeds",
    "baseline",
    "paper_baseline",
    "asha",
    "variants",
    "description",
    "steps",
    "hold",
}
HOLDS = ("steps", "images")
_VARIANT_KEYS = {"name", "set", "paper", "note"}
_ASHA_KEYS = {"enabled", "metric", "grace_epochs", "reduction_factor"}


class SweepError(UserError, ValueError):
    """A sweep file or preset is wrong; the message names the file, the key and the fix."""


@dataclass
class Variant:
    name: str
    set: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None  # the paper's linear top-1 for this row (ImageNet, 300 epochs)
    note: str = ""

    @property
    def slug(self) -> str:
        return slugify(self.name)


@dataclass
class Asha:
    enabled: bool = False
    metric: str = "online_probe_acc"  # reported every epoch by every trial
    grace_epochs: int = 1
    reduction_factor: int = 2


@dataclass
class SweepSpec:
    name: str
    ablation: str
    base_config: str  # absolute path
    variants: list[Variant]
    baseline: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict[str, Any] = field(default_factory=dict)
    paper_baseline: float | None = None
    asha: Asha = field(default_factory=Asha)
    description: str = ""
    source: str = ""
    steps: int = 0  # the baseline's optimiser steps; 0 = planned when the sweep starts
    hold: str = "steps"  # what every variant keeps equal to the baseline: "steps" or "images"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        d = dict(d)
        d["variants"] = [Variant(**v) for v in d["variants"]]
        d["asha"] = Asha(**d["asha"])
        return cls(**d)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def fingerprint(self, cli_overrides: list[str]) -> str:
        """Identifies what the trials run; a resumed sweep must have the same one."""
        d = self.to_dict()
        d.pop("source")
        d.pop("description")
        d["base"] = Path(self.base_config).read_text()
        d["cli"] = list(cli_overrides)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def trial_config(self, variant: str, seed: int, cli_overrides: list[str], instance: str = "") -> Config:
        """base file <- sweep overrides <- command-line overrides <- the variant's settings <- seed and name.

        The variant comes after the command line so that a global override (e.g. run.output_dir=...) can
        never silently undo what the row is an ablation of. Every layer here also wins over the base file's
        `on_gpu` recipe (`Config.override`), as the command line does for `byol-ray train`.
        """
        v = self.variant(variant)
        try:
            cfg = load_config(self.base_config, [])
            cfg = cfg.override(self.overrides)
            cfg = cfg.override(dict(parse_override(o) for o in cli_overrides))
            cfg = cfg.override(v.set)
            name = "-".join(x for x in (self.name, instance, v.slug, f"s{seed}") if x)
            cfg = cfg.override(
                {
                    "run.seed": seed,
                    "run.name": name,
                    # Absolute: Tune and Ray Train run each trial in their own working directory.
                    "run.output_dir": str(cfg.output_dir),
                    "data.root": str(Path(cfg.data.root).expanduser().resolve()),
                }
            )
        except ConfigError as e:
            raise SweepError(f"sweep {self.name!r} ({self.source}), variant {variant!r}: {e}") from None
        return cfg


def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
    return s or "variant"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def resolve_sweep_path(name_or_path: str) -> Path:
    """A preset name (`tau`) or a path to a sweep YAML file."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not p.is_file():
            raise SweepError(
                f"sweep file {p} does not exist; pass a preset name ({', '.join(presets())}) "
                f"or the path of a sweep YAML file"
            )
        return p.resolve()
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise SweepError(
            f"unknown sweep preset {name_or_path!r}; the presets are: {', '.join(presets())} "
            f"(in {PRESET_DIR}), or pass the path of your own sweep YAML file"
        )
    return preset


def load_sweep(name_or_path: str, cli_overrides: list[str] | None = None) -> SweepSpec:
    """Load and fully validate a sweep (every trial's config is built once here)."""
    path = resolve_sweep_path(name_or_path)
    where = f"sweep file {path}"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(
            f"{where} is not valid YAML at {yaml_problem(e)}. Fix the syntax at that line; "
            f"experiments/sweeps/tau.yaml shows the expected layout."
        ) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{where} must be a mapping with name:, base_config:, baseline: and variants:")
    _no_unknown(raw, _TOP_KEYS, where)
    for key in ("name", "base_config", "baseline", "variants"):
        if key not in raw:
            raise SweepError(f"{where} has no {key}: key (required: name, base_config, baseline, variants)")
    name = str(raw["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
    base = (path.parent / str(raw["base_config"])).resolve()
    if not base.is_file():
        raise SweepError(f"{where}: base_config {raw['base_config']!r} does not exist (looked for {base})")

    seeds_raw = raw.get("seeds", 3)
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool) and seeds_raw >= 1:
        seeds = list(range(seeds_raw))
    elif isinstance(seeds_raw, list) and seeds_raw and all(isinstance(s, int) for s in seeds_raw):
        seeds = [int(s) for s in seeds_raw]
        if len(set(seeds)) != len(seeds):
            raise SweepError(f"{where}: seeds {seeds} lists a seed twice")
    else:
        raise SweepError(f"{where}: seeds must be a count >= 1 or a list of integers, got {seeds_raw!r}")

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: overrides must be a mapping of section.key: value, got {overrides!r}")

    variants_raw = raw["variants"]
    if not isinstance(variants_raw, list) or not variants_raw:
        raise SweepError(f"{where}: variants must be a non-empty list of {{name:, set:, paper:}} entries")
    variants: list[Variant] = []
    for i, v in enumerate(variants_raw):
        vwhere = f"{where}, variants[{i}]"
        if not isinstance(v, dict) or "name" not in v:
            raise SweepError(f"{vwhere} must be a mapping with at least a name: key, got {v!r}")
        _no_unknown(v, _VARIANT_KEYS, vwhere)
        sets = v.get("set") or {}
        if not isinstance(sets, dict):
            raise SweepError(f"{vwhere}: set must be a mapping of section.key: value, got {sets!r}")
        paper = v.get("paper")
        if paper is not None and not isinstance(paper, (int, float)):
            raise SweepError(f"{vwhere}: paper must be a number (the paper's top-1), got {paper!r}")
        variants.append(
            Variant(str(v["name"]), dict(sets), None if paper is None else float(paper), str(v.get("note", "")))
        )
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{where}: variant name(s) {dupes} appear twice; names must be unique")
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise SweepError(f"{where}: variant names {names} differ only in punctuation; make them distinct")
    baseline = str(raw["baseline"])
    if baseline not in names:
        raise SweepError(f"{where}: baseline {baseline!r} is not one of the variants ({', '.join(names)})")

    asha_raw = raw.get("asha") or {}
    if not isinstance(asha_raw, dict):
        raise SweepError(f"{where}: asha must be a mapping ({', '.join(sorted(_ASHA_KEYS))})")
    _no_unknown(asha_raw, _ASHA_KEYS, f"{where}, asha")
    asha = Asha(**{**asdict(Asha()), **asha_raw})
    if asha.grace_epochs < 1 or asha.reduction_factor < 2:
        raise SweepError(f"{where}: asha needs grace_epochs >= 1 and reduction_factor >= 2")

    steps = raw.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < ("steps" in raw):
        raise SweepError(
            f"{where}: steps must be a whole number of optimiser steps >= 1 (or left out to plan them), got {steps!r}"
        )
    hold = str(raw.get("hold", "steps"))
    if hold not in HOLDS:
        raise SweepError(
            f"{where}: hold {hold!r} must be steps (every variant trains the same optimiser steps) or images "
            f"(the same images: steps scale with 1 / batch size)"
        )

    pb = raw.get("paper_baseline")
    spec = SweepSpec(
        name=name,
        ablation=str(raw.get("ablation", name)),
        base_config=str(base),
        variants=variants,
        baseline=baseline,
        seeds=seeds,
        overrides=dict(overrides),
        paper_baseline=None if pb is None else float(pb),
        asha=asha,
        description=str(raw.get("description", "")),
        source=str(path),
        steps=steps,
        hold=hold,
    )
    for v in variants:  # every trial's config, validated now
        spec.trial_config(v.name, seeds[0], cli_overrides or [])
    return spec


def _no_unknown(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, d)) - allowed)
    if unknown:
        raise SweepError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}")
