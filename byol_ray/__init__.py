"""byol-ray: BYOL self-supervised pretraining on Ray Train, tracked in MLflow.

Entry points: ``python -m byol_ray.train`` (or ``byol-ray train``); the per-worker loop is
``byol_ray.training.loop.pretrain``; configuration is ``byol_ray.config``.
"""

__version__ = "0.1.0"
