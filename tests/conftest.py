"""Shared fixtures: one torch thread (the 2 cores are shared) and the local Fashion-MNIST files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fmnist_root() -> str:
    """The Fashion-MNIST IDX files (Debian's dataset-fashion-mnist); tests that need them skip without."""
    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed under {FMNIST_ROOT} (scripts/setup.sh installs it)")
    return str(FMNIST_ROOT)


@pytest.fixture(autouse=True)
def no_ambient_tracking_uri():
    """`mlflow.set_tracking_uri` (which tests call to read a store back) exports MLFLOW_TRACKING_URI, which
    the driver honours and `ray start` hands on to every job: without this, a test would write to the
    store of whichever test ran before it."""
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def image_folder(tmp_path):
    """A real ImageNet-style folder: 3 classes of PNGs (lossless) with different sizes and aspects."""
    from helpers import write_image_folder

    return write_image_folder(tmp_path / "imgs")
