"""The one configuration system: typed dataclasses, loaded from YAML plus overrides, validated at load time.

Everything (the CLI, the Ray Train driver, the per-worker loop, sweeps, tests) builds a `Config` through
`load_config` or `Config.from_dict`, so a bad value fails at load time with a message naming the field,
before any Ray or MLflow resource is touched.

- ``schema.py``: the sections, keys and defaults (`ConfigFields`), the names users type (`AUG_OPS`, ...)
  and `ConfigError`.
- ``coerce.py``: typed dataclasses from plain dicts (YAML, overrides, a saved config's dict).
- ``validate.py``: every value check (`validate`).
- ``load.py``: `Config` (`from_dict`, `replace`), YAML files, `key=value` overrides, the layer order.
- ``gpu_recipe.py``: the `on_gpu` recipe applied for a run on GPUs (`apply_gpu_recipe`).

What a run uses, layer by layer (each later layer wins):

1. the dataclass defaults (``schema.py``);
2. the YAML file, section by section (`load_config` -> `load_yaml` and `_merge`, ``load.py``);
3. the command-line `section.key=value` overrides (`load_config` -> `parse_override`, ``load.py``); each
   also removes the same key from `on_gpu`, so it wins over the GPU recipe too;
4. validation (`validate`, ``validate.py``), by `Config.from_dict` at the end of `load_config`;
5. on GPUs, the config's `on_gpu` recipe (`apply_gpu_recipe`, ``gpu_recipe.py``, called by
   `distributed.driver.run_training`).
"""

from .gpu_recipe import apply_gpu_recipe
from .load import Config, load_config, load_yaml, parse_override, yaml_problem
from .schema import (
    AUG_OPS,
    BACKBONES,
    COMPILE_MODES,
    CRASH_KINDS,
    DATASETS,
    OPTIMIZERS,
    PRECISIONS,
    STEMS,
    TARGET_BN_MODES,
    TAU_SCHEDULES,
    AugmentConfig,
    ConfigError,
    DataConfig,
    DebugConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrackingConfig,
    ViewConfig,
)
from .validate import validate

__all__ = [
    "AUG_OPS",
    "BACKBONES",
    "COMPILE_MODES",
    "CRASH_KINDS",
    "DATASETS",
    "OPTIMIZERS",
    "PRECISIONS",
    "STEMS",
    "TARGET_BN_MODES",
    "TAU_SCHEDULES",
    "AugmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrackingConfig",
    "ViewConfig",
    "apply_gpu_recipe",
    "load_config",
    "load_yaml",
    "parse_override",
    "validate",
    "yaml_problem",
]
