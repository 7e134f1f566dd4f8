"""Image-classification datasets read from local files into uint8 tensors.

Nothing here downloads: every reader takes the files the user already has under ``data.root`` and
fails with a `DataError` that names the path, the problem and the fix. The whole split is decoded into
one ``uint8 [N, C, H, W]`` tensor up front; augmentation happens later on batches, so the raw pixels are
all a loader needs to hold (Fashion-MNIST train is 47 MB, CIFAR 150 MB, STL-10 unlabeled 2.7 GB).

Formats (``data.dataset``):

* ``fashion_mnist``: IDX files (gzip or not), as Debian's ``dataset-fashion-mnist`` installs them.
* ``cifar10`` / ``cifar100``: the official "python version" pickle batches. ``pickle`` can run code
  while loading, so it is only ever applied to these files: point ``data.root`` at trusted files only.
* ``stl10``: the official binary version (column-major uint8 images, 1-based labels).
* ``folder``: ImageNet-style ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (or ``test``),
  resized (shorter side) and centre-cropped to ``data.image_size``.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from ..errors import UserError

SPLITS = ("train", "test", "unlabeled")


class DataError(UserError):
    """Dataset files are missing or malformed; the message names the path, the problem and the fix."""


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W], contiguous, C in {1, 3}
    labels: torch.Tensor  # int64 [N]; -1 = unlabeled
    classes: list[str]  # class names, index = label
    name: str  # "<dataset>/<split>"

    def __post_init__(self) -> None:
        # Every consumer (augmentation, kNN, probes) relies on these; a reader bug should fail here.
        im, lb = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] not in (1, 3) or not im.is_contiguous():
            raise ValueError(
                f"{self.name}: images must be contiguous uint8 [N, 1|3, H, W], got {im.dtype} {tuple(im.shape)}"
            )
        if lb.dtype != torch.int64 or lb.shape != (im.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 [{im.shape[0]}], got {lb.dtype} {tuple(lb.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def subset(self, n: int) -> ImageData:
        """The first n images; n=0 (or n >= len) returns self."""
        if n <= 0 or n >= len(self):
            return self
        # Cloned so that the full split's memory can be freed once the caller drops it.
        return ImageData(self.images[:n].clone(), self.labels[:n].clone(), list(self.classes), self.name)


# ---- public API ---------------------------------------------------------------------------------
def load_split(cfg: DataConfig, split: str) -> ImageData:
    """One split of ``cfg.dataset``; ``train`` and ``unlabeled`` honour ``cfg.train_subset``, ``test``
    honours ``cfg.test_subset`` (the first N images, applied before decoding where the format allows)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    limit = cfg.test_subset if split == "test" else cfg.train_subset
    return _format(cfg).read(cfg, split, limit)


def check_data(cfg: DataConfig) -> int | None:
    """Cheap pre-flight before starting workers: the train and test files exist and their headers and
    sizes are consistent. Reads headers and file sizes only, never all the pixels.

    Returns how many training images a run reads (after data.train_subset); None where only reading the
    data would tell (CIFAR's pickles), unless the subset bounds it."""
    fmt = _format(cfg)
    n_train = fmt.check(cfg, "train")
    fmt.check(cfg, "test")
    if cfg.train_subset:
        return cfg.train_subset if n_train is None else min(n_train, cfg.train_subset)
    return n_train


def channel_stats(images: torch.Tensor, chunk_elems: int = 1 << 24) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images scaled to [0, 1].

    Sums are accumulated in int64 over chunks of about ``chunk_elems`` values, which is exact for any
    realistic dataset (sum of squares < 2^63 up to ~1.4e14 pixels per channel), and only a chunk is
    ever widened; the final mean/variance are float64.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected non-empty uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    n, c = images.shape[:2]
    per_image = images[0].numel()
    step = max(1, chunk_elems // per_image)
    s = torch.zeros(c, dtype=torch.int64)
    ss = torch.zeros(c, dtype=torch.int64)
    for i in range(0, n, step):
        x = images[i : i + step].to(torch.int64)
        s += x.sum(dim=(0, 2, 3))
        ss += (x * x).sum(dim=(0, 2, 3))
    count = n * per_image // c
    mean = s.double() / count
    var = (ss.double() / count - mean * mean).clamp_min(0.0)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).tolist())


# ---- shared helpers -----------------------------------------------------------------------------
_FIX = {
    "fashion_mnist": "install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist), or point data.root at a folder holding train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not)",
    "cifar10": "extract the CIFAR-10 python version (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) and point data.root at the cifar-10-batches-py folder or its parent",
    "cifar100": "extract the CIFAR-100 python version (cifar-100-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) and point data.root at the cifar-100-python folder or its parent",
    "stl10": "extract the STL-10 binary version (stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/) "
    "and point data.root at the stl10_binary folder or its parent",
    "folder": "arrange images as data.root/train/<class>/*.jpg and data.root/val/<class>/*.jpg "
    "(jpg, jpeg, png, bmp or webp; `test` is accepted instead of `val`)",
}
_REFETCH = "the file is truncated or corrupt: replace it with a fresh copy from the original archive, or "


def data_error(path: Path | str, problem: str, fix: str) -> DataError:
    return DataError(f"{path}: {problem}. Fix: {fix}.")


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise data_error(
            root, f"data.root does not exist or is not a folder (data.dataset={cfg.dataset})", _FIX[cfg.dataset]
        )
    return root


def _find_dir(cfg: DataConfig, subfolder: str, marker: str) -> Path:
    """The folder holding ``marker``: data.root/<subfolder> (as the archive extracts) or data.root itself."""
    root = _root(cfg)
    for d in (root / subfolder, root):
        if (d / marker).is_file():
            return d
    raise data_error(root / marker, f"file {marker} not found here nor in {root / subfolder}", _FIX[cfg.dataset])


def _require(cfg: DataConfig, path: Path) -> Path:
    if not path.is_file():
        raise data_error(path, "file not found", _FIX[cfg.dataset])
    return path


def _same_count(cfg: DataConfig, images: Path, n_images: int, labels: Path, n_labels: int) -> None:
    if n_images != n_labels:
        problem = f"holds {n_images} images but {labels} holds {n_labels} labels"
        raise data_error(images, problem, _REFETCH + _FIX[cfg.dataset])


def _finish(
    cfg: DataConfig, split: str, source: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], limit: int
) -> ImageData:
    """Slice to the subset *before* copying (so a memmap is read once, only as far as needed), validate
    labels, and hand back contiguous torch tensors."""
    if limit > 0:
        images, labels = images[:limit], labels[:limit]
    if len(images) == 0:
        raise data_error(source, "holds no images", _REFETCH + _FIX[cfg.dataset])
    labels = labels.astype(np.int64)
    lowest = -1 if split == "unlabeled" else 0  # -1 marks "no label", valid only where there are none
    bad = (labels < lowest) | (labels >= len(classes))
    if bad.any():
        raise data_error(source, f"a label of these images is {int(labels[bad][0])}, outside 0..{len(classes) - 1}",
                   _REFETCH + _FIX[cfg.dataset])  # fmt: skip
    images = np.ascontiguousarray(images)  # copies a memmap'd or transposed view: the one real read
    if not images.flags.writeable:  # torch.from_numpy wants writable memory (np.frombuffer of bytes is not)
        images = images.copy()
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels), list(classes), f"{cfg.dataset}/{split}")


def _no_unlabeled(cfg: DataConfig) -> DataError:
    return DataError(
        f"{cfg.root}: dataset {cfg.dataset} has no 'unlabeled' split (only stl10 does). "
        "Fix: pretrain on the 'train' split, or use data.dataset=stl10."
    )


# ---- fashion_mnist: IDX -------------------------------------------------------------------------
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # uint8 data (0x08), 3 resp. 1 dimensions


def _idx_paths(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    if split == "unlabeled":
        raise _no_unlabeled(cfg)
    root = _root(cfg)
    prefix = "train" if split == "train" else "t10k"
    out = []
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = [p for p in (root / f"{name}.gz", root / name) if p.is_file()]
        if not found:
            raise data_error(root / f"{name}.gz", f"neither {name}.gz nor {name} found", _FIX[cfg.dataset])
        out.append(found[0])
    return out[0], out[1]


def _idx_header(cfg: DataConfig, path: Path, head: bytes, magic: int) -> tuple[int, tuple[int, ...]]:
    """(header length, dims) after checking the magic number against what this file must hold."""
    fix = _REFETCH + _FIX[cfg.dataset]
    if len(head) < 4:
        raise data_error(path, "too short to hold an IDX header", fix)
    (got,) = struct.unpack(">I", head[:4])
    if got != magic:
        problem = f"IDX magic number is 0x{got:08x}, expected 0x{magic:08x}; not a uint8 IDX file of the right kind"
        raise data_error(path, problem, fix)
    ndim = magic & 0xFF
    hlen = 4 + 4 * ndim
    if len(head) < hlen:
        raise data_error(path, "IDX header is truncated", fix)
    return hlen, struct.unpack(f">{ndim}I", head[4:hlen])


def _idx_bytes(cfg: DataConfig, path: Path, size: int = -1) -> bytes:
    """The decompressed content (or its first ``size`` bytes)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read(size)
        with open(path, "rb") as f:
            return f.read(size)
    except (OSError, EOFError, zlib.error) as e:
        raise data_error(path, f"cannot be read or decompressed ({e})", _REFETCH + _FIX[cfg.dataset]) from None


def _idx_check_length(cfg: DataConfig, path: Path, size: int, hlen: int, dims: tuple[int, ...]) -> None:
    if size != hlen + math.prod(dims):
        raise data_error(path, f"holds {size - hlen} payload bytes but its header {list(dims)} needs {math.prod(dims)}",
                   _REFETCH + _FIX[cfg.dataset])  # fmt: skip


def _read_idx(cfg: DataConfig, path: Path, magic: int) -> np.ndarray:
    raw = _idx_bytes(cfg, path)
    hlen, dims = _idx_header(cfg, path, raw, magic)
    _idx_check_length(cfg, path, len(raw), hlen, dims)
    return np.frombuffer(raw, dtype=np.uint8, offset=hlen).reshape(dims)


def _idx_dims(cfg: DataConfig, path: Path, magic: int) -> tuple[int, ...]:
    hlen, dims = _idx_header(cfg, path, _idx_bytes(cfg, path, 4 + 4 * (magic & 0xFF)), magic)
    if path.suffix == ".gz":
        # A gzip member ends with its uncompressed size mod 2^32 (ISIZE): the payload length without
        # decompressing. A truncated file ends mid-stream, so these 4 bytes are then almost surely wrong.
        with open(path, "rb") as f:
            f.seek(-4, 2)
            (isize,) = struct.unpack("<I", f.read(4))
        want = hlen + math.prod(dims)
        if isize != want % (1 << 32):
            raise data_error(
                path,
                f"gzip trailer says {isize} uncompressed bytes but the header {list(dims)} needs {want}; "
                "the file is probably truncated",
                _REFETCH + _FIX[cfg.dataset],
            )
    else:
        _idx_check_length(cfg, path, path.stat().st_size, hlen, dims)
    return dims


def _read_fashion_mnist(cfg: DataConfig, split: str, limit: int) -> ImageData:
    ipath, lpath = _idx_paths(cfg, split)
    images = _read_idx(cfg, ipath, _IDX_IMAGES)
    labels = _read_idx(cfg, lpath, _IDX_LABELS)
    _same_count(cfg, ipath, len(images), lpath, len(labels))
    return _finish(cfg, split, ipath, images[:, None], labels, FASHION_MNIST_CLASSES, limit)


def _check_fashion_mnist(cfg: DataConfig, split: str) -> int:
    ipath, lpath = _idx_paths(cfg, split)
    n_images = _idx_dims(cfg, ipath, _IDX_IMAGES)[0]
    _same_count(cfg, ipath, n_images, lpath, _idx_dims(cfg, lpath, _IDX_LABELS)[0])
    return n_images


# ---- cifar10 / cifar100: python pickles ---------------------------------------------------------
@dataclass(frozen=True)
class _CifarLayout:
    subfolder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                            "batches.meta", "labels", "label_names"),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}  # fmt: skip


def _cifar_files(cfg: DataConfig, split: str) -> tuple[list[Path], Path]:
    if split == "unlabeled":
        raise _no_unlabeled(cfg)
    lay = _CIFAR[cfg.dataset]
    names = lay.train if split == "train" else lay.test
    d = _find_dir(cfg, lay.subfolder, names[0])
    return [_require(cfg, d / n) for n in names], _require(cfg, d / lay.meta)


def _unpickle(cfg: DataConfig, path: Path) -> dict:
    # Trusted files only: unpickling can execute arbitrary code (see the module docstring).
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # written by Python 2: str keys come back as bytes
    except Exception as e:  # unpickling a damaged file can raise almost anything
        raise data_error(
            path, f"is not a readable pickle ({type(e).__name__}: {e})", _REFETCH + _FIX[cfg.dataset]
        ) from None
    if not isinstance(d, dict):
        raise data_error(path, f"holds a {type(d).__name__}, expected a dict of arrays", _REFETCH + _FIX[cfg.dataset])
    return d


def _field(cfg: DataConfig, d: dict, key: str, path: Path):
    # Official files have bytes keys; accept str keys too, from batches re-saved under Python 3.
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise data_error(path, f"has no '{key}' entry", _REFETCH + _FIX[cfg.dataset])


def _read_cifar(cfg: DataConfig, split: str, limit: int) -> ImageData:
    lay = _CIFAR[cfg.dataset]
    files, meta = _cifar_files(cfg, split)
    names = _field(cfg, _unpickle(cfg, meta), lay.names_key, meta)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    images, labels = [], []
    for path in files:
        d = _unpickle(cfg, path)
        data = np.asarray(_field(cfg, d, "data", path), dtype=np.uint8)
        lab = np.asarray(_field(cfg, d, lay.labels_key, path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise data_error(path, f"'data' has shape {data.shape}, expected [N, 3072]", _REFETCH + _FIX[cfg.dataset])
        _same_count(cfg, path, len(data), path, len(lab))
        images.append(data.reshape(-1, 3, 32, 32))  # each row: R, G, B planes of 32x32, row-major
        labels.append(lab)
        if 0 < limit <= sum(map(len, labels)):  # later batches are not needed for the subset
            break
    return _finish(cfg, split, files[0], np.concatenate(images), np.concatenate(labels), classes, limit)


def _check_cifar(cfg: DataConfig, split: str) -> None:  # counting would mean unpickling
    files, meta = _cifar_files(cfg, split)
    for path in (*files, meta):
        # Every pickle ends with the STOP opcode '.': a cheap truncation test without unpickling.
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 1))
            if f.read(1) != b".":
                raise data_error(
                    path, "is empty or truncated (does not end like a pickle)", _REFETCH + _FIX[cfg.dataset]
                )


# ---- stl10: binary ------------------------------------------------------------------------------
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_STL_IMAGE = 3 * 96 * 96


def _stl_files(cfg: DataConfig, split: str) -> tuple[Path, Path | None, Path]:
    d = _find_dir(cfg, "stl10_binary", f"{split}_X.bin")
    y = None if split == "unlabeled" else _require(cfg, d / f"{split}_y.bin")
    return d / f"{split}_X.bin", y, d


def _stl_count(cfg: DataConfig, path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % _STL_IMAGE:
        raise data_error(
            path,
            f"size {size} bytes is not a positive multiple of one 3x96x96 image ({_STL_IMAGE} bytes)",
            _REFETCH + _FIX[cfg.dataset],
        )
    return size // _STL_IMAGE


def _read_stl10(cfg: DataConfig, split: str, limit: int) -> ImageData:
    xpath, ypath, d = _stl_files(cfg, split)
    n = _stl_count(cfg, xpath)
    # Memory-mapped so that _finish reads only the subset, once; stored column-major per channel.
    images = np.memmap(xpath, dtype=np.uint8, mode="r", shape=(n, 3, 96, 96)).transpose(0, 1, 3, 2)
    if ypath is None:
        labels = np.full(n, -1, dtype=np.int64)
    else:
        labels = np.fromfile(ypath, dtype=np.uint8).astype(np.int64) - 1  # 1..10 on disk
        _same_count(cfg, xpath, n, ypath, len(labels))
    names = d / "class_names.txt"
    classes = [s.strip() for s in names.read_text().splitlines() if s.strip()] if names.is_file() else STL10_CLASSES
    return _finish(cfg, split, xpath, images, labels, classes, limit)


def _check_stl10(cfg: DataConfig, split: str) -> int:
    xpath, ypath, _ = _stl_files(cfg, split)
    n_images = _stl_count(cfg, xpath)
    if ypath is not None:  # the unlabeled split has no label file
        _same_count(cfg, xpath, n_images, ypath, ypath.stat().st_size)  # labels: one byte each
    return n_images


# ---- folder: ImageNet-style class folders -------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _class_dirs(cfg: DataConfig, d: Path) -> list[Path]:
    dirs = sorted(p for p in d.iterdir() if p.is_dir())
    if not dirs:
        raise data_error(d, "holds no class folders", _FIX[cfg.dataset])
    return dirs


def folder_files(cfg: DataConfig, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    if split == "unlabeled":
        raise _no_unlabeled(cfg)
    root = _root(cfg)
    names = ("train",) if split == "train" else ("val", "test")
    split_dir = next((root / n for n in names if (root / n).is_dir()), None)
    if split_dir is None:
        raise data_error(
            root / names[0], f"split folder not found (looked for {' or '.join(names)})", _FIX[cfg.dataset]
        )
    # Labels index the train split's classes, so that train and test labels agree even if the test
    # folder lacks a class.
    classes = [p.name for p in _class_dirs(cfg, root / "train" if (root / "train").is_dir() else split_dir)]
    files = []
    for cdir in _class_dirs(cfg, split_dir):
        if cdir.name not in classes:
            raise data_error(cdir, "is a class folder that the train split does not have", _FIX[cfg.dataset])
        label = classes.index(cdir.name)
        files += [(p, label) for p in sorted(cdir.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        problem = f"holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders"
        raise data_error(split_dir, problem, _FIX[cfg.dataset])
    return files, classes


def decode_image(path: Path | str, size: int) -> np.ndarray:
    """RGB [3, size, size]: shorter side resized to ``size``, then centre-cropped."""
    try:
        with Image.open(path) as f:
            im = f.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise data_error(path, f"cannot be decoded as an image ({e})", "delete or replace this file") from None


def _read_folder(cfg: DataConfig, split: str, limit: int) -> ImageData:
    files, classes = folder_files(cfg, split)
    if limit > 0:
        files = files[:limit]  # decode only what the subset needs
    n, size = len(files), cfg.image_size
    out = np.empty((n, 3, size, size), dtype=np.uint8)  # filled in place: no list of arrays + stack copy

    def decode_into(i: int) -> None:
        out[i] = decode_image(files[i][0], size)

    # PIL releases the GIL while decoding, so threads help (data.num_workers of them, at least one).
    # Work is submitted a tenth at a time to bound the queued futures and to report progress.
    pool = ThreadPoolExecutor(max_workers=max(1, cfg.num_workers))
    try:
        step = math.ceil(n / 10)
        for start in range(0, n, step):
            list(pool.map(decode_into, range(start, min(n, start + step))))
            if n > 2000:
                done = min(n, start + step)
                print(f"[data] {cfg.dataset}/{split}: decoded {done}/{n} images", file=sys.stderr, flush=True)
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, don't decode the rest of the chunk
    labels = np.array([lab for _, lab in files], dtype=np.int64)
    return _finish(cfg, split, files[0][0].parent.parent, out, labels, classes, 0)


def _check_folder(cfg: DataConfig, split: str) -> int:
    return len(folder_files(cfg, split)[0])


# ---- dispatch -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Format:
    read: Callable[[DataConfig, str, int], ImageData]
    check: Callable[[DataConfig, str], int | None]  # the split's image count, where cheap to know


_FORMATS = {
    "fashion_mnist": _Format(_read_fashion_mnist, _check_fashion_mnist),
    "cifar10": _Format(_read_cifar, _check_cifar),
    "cifar100": _Format(_read_cifar, _check_cifar),
    "stl10": _Format(_read_stl10, _check_stl10),
    "folder": _Format(_read_folder, _check_folder),
}


def _format(cfg: DataConfig) -> _Format:
    if cfg.dataset not in _FORMATS:
        raise DataError(f"{cfg.root}: unknown data.dataset {cfg.dataset!r}. Fix: choose one of {', '.join(_FORMATS)}.")
    return _FORMATS[cfg.dataset]
