"""The last layer of a config: its `on_gpu` recipe, applied when the run's workers train on GPUs.

The driver (``distributed.driver.run_training``) calls `apply_gpu_recipe` once it knows where the workers
run (``distributed.cluster.training_device``), before it starts them.
"""

from __future__ import annotations

from .load import Config


def apply_gpu_recipe(cfg: Config, device_type: str) -> Config:
    """The config a run on `device_type` ("cpu" or "cuda") trains with: on GPUs the config's `on_gpu`
    recipe applied and run.device made explicit; on CPUs the config as it is."""
    if device_type != "cuda":
        return cfg
    return cfg.replace({**cfg.on_gpu, "on_gpu": {}, "run.device": "cuda"})
