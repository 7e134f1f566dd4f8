"""The one configuration system: typed dataclasses, loaded from YAML plus overrides, validated at load time.

Everything (the CLI, the Ray Train driver, the per-worker loop, sweeps, tests) builds a `Config` through
`load_config` or `Config.from_dict`, so a bad value fails at load time with a message naming the field,
before any Ray or MLflow resource is touched.

- ``schema.py``: the sections, keys and defaults (`ConfigFields`), the names users type (`AUG_OPS`, ...)
  and `ConfigError`.
- ``coerce.py``: typed dataclasses from plain dicts (YAML, overrides, a saved config's dict): `build`.
- ``validate.py``: every value check: `validate`.
- ``load.py``: `Config` (`from_dict`, `replace`), YAML files, `key=value` overrides, the layer order:
  `load_config`.
- ``gpu_recipe.py``: the config's `on_gpu` recipe, applied for a run on GPUs: `apply_gpu_recipe`.

What a run uses, in the order the layers apply (a later one wins):

1. The dataclass defaults (``schema.py``).
2. The YAML file, merged over them section by section (`load_config` -> `load_yaml`, `_merge`; ``load.py``);
   its `on_gpu:` mapping is taken whole.
3. The command-line `section.key=value` overrides, in the order given (`load_config` -> `parse_override`,
   `set_dotted`; ``load.py``). Each also removes the same key from `on_gpu`, so the command line wins over
   the GPU recipe too.
4. Validation, once for the loaded config: `Config.from_dict` at the end of `load_config` types every value
   (`build`, ``coerce.py``) and checks it (`validate`, ``validate.py``). When `on_gpu` is set it also checks
   the config with the recipe applied, so a bad GPU recipe fails at load time even on a CPU machine.
5. The GPU recipe, when the workers train on GPUs: `apply_gpu_recipe` (``gpu_recipe.py``), called by
   `distributed.driver.run_training` with `distributed.cluster.training_device` (run.device, or for "auto"
   whether the Ray cluster has GPUs). It sets every `on_gpu` key, empties `on_gpu` and sets run.device=cuda,
   through `Config.replace`, which validates the result again; on CPUs the config stays as it is. Only the
   Ray driver applies it (`byol-ray train`, each sweep trial); in-process runs do not (`byol-ray bench`,
   ``experiments/fingerprint.py``, ``experiments/fmnist_quality.py``, tests that call
   `training.loop.pretrain` directly): they train on the config as loaded.

Every later `Config.from_dict`, `Config.replace` or `Config.override` validates its result with the same
rules (the recipe above, a sweep's layers, each worker rebuilding the driver's config). `Config.replace`
sets keys without touching `on_gpu`; `Config.override` also drops each key from `on_gpu`, as the command
line does, so the layers a sweep adds with it (``sweep_spec.SweepSpec.trial_config``: the sweep's
overrides, its command line, the variant, seed and name) win over a base config's `on_gpu` on GPUs too.
"""

from .gpu_recipe import apply_gpu_recipe
from .load import Config, load_config, load_yaml, parse_override, yaml_problem
from .schema import (
    AUG_OPS,
    BACKBONES,
    COMPILE_MODES,
    CRASH_KINDS,
    DATASETS,
    LOADERS,
    OPTIMIZERS,
    PAUSE_PHASES,
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
    "PAUSE_PHASES",
    "DATASETS",
    "LOADERS",
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
