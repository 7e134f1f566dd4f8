"""byol_ray.data: every reader against small files written in the real on-disk formats.

Expected pixel values are computed from the *file* offsets each format's specification defines
(IDX row-major, CIFAR R/G/B planes row-major, STL-10 column-major planes), not by repeating the
reader's reshape, so a wrong axis order or orientation fails here.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from byol_ray.config import DataConfig
from byol_ray.data.readers import (
    FASHION_MNIST_CLASSES,
    DataError,
    ImageData,
    channel_stats,
    check_data,
    load_split,
)


def _raises(path, fn, *args):
    """fn(*args) raises DataError whose message names ``path``."""
    with pytest.raises(DataError) as ei:
        fn(*args)
    assert str(path) in str(ei.value), str(ei.value)
    return str(ei.value)


# ---- fashion_mnist (IDX) ------------------------------------------------------------------------
def _idx_pixel(n, y, x):
    return (n * 31 + y * 7 + x * 3) % 256


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes, gz: bool) -> Path:
    raw = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def _fmnist(root: Path, gz=True, n_train=5, n_test=3, h=4, w=6):
    """IDX files with non-square images (h rows, w columns) so a transposed read cannot pass."""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        pix = bytes(_idx_pixel(i, y, x) for i in range(n) for y in range(h) for x in range(w))  # row-major
        out[prefix + "-images"] = _write_idx(root / f"{prefix}-images-idx3-ubyte", 0x803, (n, h, w), pix, gz)
        labels = bytes((i * 3) % 10 for i in range(n))
        out[prefix + "-labels"] = _write_idx(root / f"{prefix}-labels-idx1-ubyte", 0x801, (n,), labels, gz)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_pixels_labels_classes(tmp_path, gz):
    _fmnist(tmp_path, gz=gz)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    check_data(cfg)
    tr = load_split(cfg, "train")
    assert tr.images.shape == (5, 1, 4, 6) and tr.images.dtype == torch.uint8 and tr.images.is_contiguous()
    assert tr.channels == 1 and len(tr) == 5 and tr.name == "fashion_mnist/train"
    for n, y, x in [(0, 0, 0), (1, 0, 5), (2, 3, 0), (4, 3, 5), (3, 1, 2)]:
        assert tr.images[n, 0, y, x].item() == _idx_pixel(n, y, x)
    assert tr.labels.dtype == torch.int64 and tr.labels.tolist() == [0, 3, 6, 9, 2]
    assert tr.classes == FASHION_MNIST_CLASSES and tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot"
    te = load_split(cfg, "test")
    assert te.images.shape == (3, 1, 4, 6) and te.labels.tolist() == [0, 3, 6]


def test_subsets(tmp_path):
    _fmnist(tmp_path)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path), train_subset=2, test_subset=1)
    tr, te = load_split(cfg, "train"), load_split(cfg, "test")
    full = load_split(DataConfig(dataset="fashion_mnist", root=str(tmp_path)), "train")
    assert len(tr) == 2 and len(te) == 1
    assert torch.equal(tr.images, full.images[:2]) and torch.equal(tr.labels, full.labels[:2])
    # ImageData.subset: 0 and oversize return self; otherwise an independent contiguous copy
    assert full.subset(0) is full and full.subset(99) is full
    s = full.subset(3)
    assert len(s) == 3 and s.images.is_contiguous() and torch.equal(s.images, full.images[:3])
    assert s.images.untyped_storage().data_ptr() != full.images.untyped_storage().data_ptr()


def test_fashion_mnist_missing_dir_and_file(tmp_path):
    missing = tmp_path / "nope"
    msg = _raises(missing, load_split, DataConfig(dataset="fashion_mnist", root=str(missing)), "train")
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    _raises(missing, check_data, DataConfig(dataset="fashion_mnist", root=str(missing)))
    files = _fmnist(tmp_path)
    files["t10k-labels"].unlink()
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    msg = _raises(tmp_path / "t10k-labels-idx1-ubyte", load_split, cfg, "test")
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    _raises(tmp_path / "t10k-labels-idx1-ubyte", check_data, cfg)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_bad_magic(tmp_path, gz):
    files = _fmnist(tmp_path, gz=gz)
    # a labels file where images belong: magic 0x801, the classic mix-up
    _write_idx(tmp_path / "train-images-idx3-ubyte", 0x801, (5,), bytes(5), gz)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    assert "magic" in _raises(files["train-images"], load_split, cfg, "train")
    assert "magic" in _raises(files["train-images"], check_data, cfg)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_truncated_payload(tmp_path, gz):
    files = _fmnist(tmp_path, gz=gz)
    pix = bytes(4 * 4 * 6)  # header says 5 images, payload holds 4
    _write_idx(tmp_path / "train-images-idx3-ubyte", 0x803, (5, 4, 6), pix, gz)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    _raises(files["train-images"], load_split, cfg, "train")
    _raises(files["train-images"], check_data, cfg)


def test_fashion_mnist_truncated_gzip_stream(tmp_path):
    files = _fmnist(tmp_path)
    p = files["train-images"]
    p.write_bytes(p.read_bytes()[:-12])  # cut mid-stream, as an interrupted copy would
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    _raises(p, load_split, cfg, "train")
    _raises(p, check_data, cfg)


def test_fashion_mnist_count_mismatch(tmp_path):
    files = _fmnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", 0x801, (4,), bytes(4), True)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    msg = _raises(files["train-images"], load_split, cfg, "train")
    assert str(files["train-labels"]) in msg
    _raises(files["train-images"], check_data, cfg)


def test_no_unlabeled_split_and_bad_split_name(tmp_path):
    _fmnist(tmp_path)
    cfg = DataConfig(dataset="fashion_mnist", root=str(tmp_path))
    with pytest.raises(DataError, match="unlabeled"):
        load_split(cfg, "unlabeled")
    with pytest.raises(ValueError, match="split"):
        load_split(cfg, "validation")


# ---- cifar10 / cifar100 (pickles) ---------------------------------------------------------------
def _cifar_byte(n, i):
    """Byte i (0..3071) of image n's row in a batch's 'data'."""
    return (i * 7 + n * 13) % 251


def _cifar_at(n, c, y, x):
    # CIFAR's spec: first 1024 bytes red, then green, then blue; each plane row-major 32x32.
    return _cifar_byte(n, c * 1024 + y * 32 + x)


def _cifar_batch(path: Path, first: int, n: int, labels_key: bytes, labels: list[int]):
    data = np.array([[_cifar_byte(first + k, i) for i in range(3072)] for k in range(n)], dtype=np.uint8)
    d = {b"batch_label": b"x", b"data": data, labels_key: labels, b"filenames": [b"f"] * n}
    if labels_key == b"fine_labels":
        d[b"coarse_labels"] = [0] * n
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _cifar10(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    for b in range(5):  # 2 images per batch; global index 2b, 2b+1
        _cifar_batch(d / f"data_batch_{b + 1}", 2 * b, 2, b"labels", [(2 * b) % 10, (2 * b + 1) % 10])
    _cifar_batch(d / "test_batch", 100, 3, b"labels", [9, 8, 7])
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072}, f, protocol=2)
    return d


def _check_pixels(images, first, side, pixel_at):
    """Corners, edges and one inner pixel of every image against the value the writer put there."""
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, side, side) and images.is_contiguous()
    e = side - 1
    for n in range(len(images)):
        for c, y, x in [
            (0, 0, 0),
            (1, 0, 0),
            (2, 0, 0),
            (0, 0, 1),
            (0, 1, 0),
            (0, 0, e),
            (0, e, 0),
            (2, e, e),
            (1, 5, 17),
        ]:
            assert images[n, c, y, x].item() == pixel_at(first + n, c, y, x), (n, c, y, x)


def _check_cifar_pixels(images, first):
    _check_pixels(images, first, 32, _cifar_at)


def test_cifar10(tmp_path):
    _cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))  # parent of cifar-10-batches-py
    check_data(cfg)
    tr = load_split(cfg, "train")
    assert len(tr) == 10 and tr.channels == 3
    _check_cifar_pixels(tr.images, 0)  # batches concatenated in order 1..5
    assert tr.labels.tolist() == list(range(10))
    assert tr.classes[1] == "automobile" and len(tr.classes) == 10
    te = load_split(cfg, "test")
    _check_cifar_pixels(te.images, 100)
    assert te.labels.tolist() == [9, 8, 7]
    sub = load_split(DataConfig(dataset="cifar10", root=str(tmp_path), train_subset=3), "train")
    assert len(sub) == 3 and torch.equal(sub.images, tr.images[:3])


def test_cifar100_in_root(tmp_path):
    _cifar_batch(tmp_path / "train", 0, 4, b"fine_labels", [99, 0, 42, 7])
    _cifar_batch(tmp_path / "test", 50, 2, b"fine_labels", [1, 2])
    names = [f"c{i}".encode() for i in range(100)]
    with open(tmp_path / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"s"] * 20}, f, protocol=2)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path))
    check_data(cfg)
    tr, te = load_split(cfg, "train"), load_split(cfg, "test")
    _check_cifar_pixels(tr.images, 0)
    _check_cifar_pixels(te.images, 50)
    assert tr.labels.tolist() == [99, 0, 42, 7] and te.labels.tolist() == [1, 2]
    assert len(tr.classes) == 100 and tr.classes[42] == "c42"


def test_cifar_errors(tmp_path):
    d = _cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    # corrupt (truncated) pickle
    p = d / "data_batch_3"
    p.write_bytes(p.read_bytes()[:-100])
    _raises(p, load_split, cfg, "train")
    _raises(p, check_data, cfg)
    # garbage that is not a pickle at all
    p.write_bytes(b"not a pickle at all")
    _raises(p, load_split, cfg, "train")
    # label/image count mismatch inside a batch
    _cifar_batch(p, 4, 2, b"labels", [1])
    _raises(p, load_split, cfg, "train")
    # missing file
    p.unlink()
    _raises(p, load_split, cfg, "train")
    _raises(p, check_data, cfg)
    # missing dir
    missing = tmp_path / "nope"
    msg = _raises(missing, load_split, DataConfig(dataset="cifar10", root=str(missing)), "test")
    assert "cifar-10-python.tar.gz" in msg


# ---- stl10 (binary, column-major) ---------------------------------------------------------------
_STL = 3 * 96 * 96


def _stl_byte(n, off):
    """Byte at offset ``off`` within image n of an X file."""
    return (off * 5 + n * 11 + off // 96) % 256


def _stl_at(n, c, y, x):
    # STL-10 stores each channel plane column-major: x (column) is the slow axis, y the fast one.
    return _stl_byte(n, c * 96 * 96 + x * 96 + y)


def _write_stl_x(path: Path, first: int, n: int):
    off = np.arange(_STL, dtype=np.int64)
    rows = [((off * 5 + (first + k) * 11 + off // 96) % 256).astype(np.uint8) for k in range(n)]
    path.write_bytes(np.concatenate(rows).tobytes())


def _stl10(root: Path) -> Path:
    d = root / "stl10_binary"
    d.mkdir()
    _write_stl_x(d / "train_X.bin", 0, 3)
    (d / "train_y.bin").write_bytes(bytes([1, 10, 5]))
    _write_stl_x(d / "test_X.bin", 10, 2)
    (d / "test_y.bin").write_bytes(bytes([2, 3]))
    _write_stl_x(d / "unlabeled_X.bin", 20, 4)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    return d


def _check_stl_pixels(images, first):
    _check_pixels(images, first, 96, _stl_at)


def test_stl10(tmp_path):
    _stl10(tmp_path)
    cfg = DataConfig(dataset="stl10", root=str(tmp_path), image_size=96)
    check_data(cfg)
    tr = load_split(cfg, "train")
    _check_stl_pixels(tr.images, 0)
    assert tr.labels.tolist() == [0, 9, 4] and tr.classes[9] == "truck" and len(tr.classes) == 10
    te = load_split(cfg, "test")
    _check_stl_pixels(te.images, 10)
    assert te.labels.tolist() == [1, 2]
    un = load_split(cfg, "unlabeled")
    _check_stl_pixels(un.images, 20)
    assert un.labels.tolist() == [-1] * 4 and un.name == "stl10/unlabeled"
    un2 = load_split(DataConfig(dataset="stl10", root=str(tmp_path / "stl10_binary"), train_subset=2), "unlabeled")
    assert len(un2) == 2 and torch.equal(un2.images, un.images[:2])


def test_stl10_errors(tmp_path):
    d = _stl10(tmp_path)
    cfg = DataConfig(dataset="stl10", root=str(tmp_path))
    (d / "test_y.bin").write_bytes(bytes([1, 2, 3]))  # 3 labels for 2 images
    _raises(d / "test_X.bin", load_split, cfg, "test")
    _raises(d / "test_X.bin", check_data, cfg)
    (d / "test_y.bin").write_bytes(bytes([1, 0]))  # 0 is not a valid 1-based label
    _raises(d / "test_X.bin", load_split, cfg, "test")
    p = d / "train_X.bin"
    p.write_bytes(p.read_bytes()[:-1])  # not a multiple of 3*96*96
    _raises(p, load_split, cfg, "train")
    _raises(p, check_data, cfg)
    (d / "train_y.bin").unlink()
    _raises(d / "train_y.bin", load_split, cfg, "train")
    (d / "unlabeled_X.bin").unlink()
    _raises(tmp_path / "unlabeled_X.bin", load_split, cfg, "unlabeled")


# ---- folder (ImageNet-style) --------------------------------------------------------------------
def _rgb_pattern(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y * 20 + x, 200 - y * 10, x * 15 + 3], axis=-1).astype(np.uint8)  # HWC


def _folder(root: Path, val="val"):
    for split in ("train", val):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
    Image.fromarray(_rgb_pattern(8, 8)).save(root / "train/cat/a.png")
    Image.fromarray(_rgb_pattern(8, 16)).save(root / "train/cat/b.PNG")  # wide: centre crop x 4..11
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(root / "train/dog/c.png")  # grayscale
    Image.fromarray(np.full((16, 16, 3), (200, 30, 90), np.uint8)).save(root / "train/dog/d.jpg", quality=95)
    (root / "train/dog/notes.txt").write_text("not an image")
    Image.fromarray(_rgb_pattern(8, 8)).save(root / val / "dog/e.png")


@pytest.mark.parametrize("val", ["val", "test"])
def test_folder(tmp_path, val):
    _folder(tmp_path, val)
    cfg = DataConfig(dataset="folder", root=str(tmp_path), image_size=8)
    check_data(cfg)
    tr = load_split(cfg, "train")
    assert tr.images.shape == (4, 3, 8, 8) and tr.images.is_contiguous() and tr.classes == ["cat", "dog"]
    assert tr.labels.tolist() == [0, 0, 1, 1]
    pat = torch.from_numpy(_rgb_pattern(8, 16)).permute(2, 0, 1)  # CHW
    assert torch.equal(tr.images[0], pat[:, :, :8])  # exact size: no resampling, channels in RGB order
    assert torch.equal(tr.images[1], pat[:, :, 4:12])  # shorter side already 8: pure centre crop
    assert (tr.images[2] == 77).all()  # grayscale -> 3 equal RGB channels
    colour = tr.images[3].double().mean(dim=(1, 2))
    assert torch.allclose(colour, torch.tensor([200.0, 30.0, 90.0], dtype=torch.float64), atol=4)  # JPEG, resized 16->8
    te = load_split(cfg, "test")
    assert te.labels.tolist() == [1] and te.classes == ["cat", "dog"]  # label indexes train's classes
    assert torch.equal(te.images[0], pat[:, :, :8])
    sub_cfg = DataConfig(dataset="folder", root=str(tmp_path), image_size=8, train_subset=2, num_workers=2)
    sub = load_split(sub_cfg, "train")
    assert len(sub) == 2 and torch.equal(sub.images, tr.images[:2])


def test_folder_resize_shorter_side(tmp_path):
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "val/a").mkdir(parents=True)
    # 20 rows x 40 cols, left half black, right half white -> resized to 10x20, cropped to cols 5..14
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 20:] = 255
    Image.fromarray(img).save(tmp_path / "train/a/x.png")
    Image.fromarray(img).save(tmp_path / "val/a/x.png")
    out = load_split(DataConfig(dataset="folder", root=str(tmp_path), image_size=10), "train").images[0]
    assert out.shape == (3, 10, 10)
    assert (out[:, :, :4] == 0).all() and (out[:, :, 6:] == 255).all()


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    _raises(missing, load_split, DataConfig(dataset="folder", root=str(missing)), "train")
    _folder(tmp_path)
    cfg = DataConfig(dataset="folder", root=str(tmp_path), image_size=8)
    bad = tmp_path / "train/cat/zz.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    _raises(bad, load_split, cfg, "train")
    bad.unlink()
    (tmp_path / "val/bird").mkdir()  # class unknown to train
    _raises(tmp_path / "val/bird", load_split, cfg, "test")
    (tmp_path / "val/bird").rmdir()
    for p in (tmp_path / "val").rglob("*.png"):
        p.unlink()
    _raises(tmp_path / "val", load_split, cfg, "test")  # class folders but no images
    _raises(tmp_path / "val", check_data, cfg)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    _raises(empty / "train", load_split, DataConfig(dataset="folder", root=str(empty)), "train")  # no class folders
    _raises(empty / "val", load_split, DataConfig(dataset="folder", root=str(empty)), "test")  # no val/test folder


# ---- channel_stats, ImageData -------------------------------------------------------------------
@pytest.mark.parametrize("c", [1, 3])
def test_channel_stats_matches_float64(c):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, c, 5, 4), dtype=torch.uint8, generator=g)
    x = images.double() / 255
    want_mean = x.mean(dim=(0, 2, 3))
    want_std = x.permute(1, 0, 2, 3).reshape(c, -1).std(dim=1, unbiased=False)
    for chunk in (1 << 24, 3 * c * 5 * 4, 1):  # one chunk; 3 images per chunk with a remainder; 1 image
        mean, std = channel_stats(images, chunk_elems=chunk)
        assert isinstance(mean, tuple) and len(mean) == c and len(std) == c
        assert torch.allclose(torch.tensor(mean, dtype=torch.float64), want_mean, rtol=0, atol=1e-12)
        assert torch.allclose(torch.tensor(std, dtype=torch.float64), want_std, rtol=0, atol=1e-12)


def test_imagedata_validates():
    ok = ImageData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"], "x/train")
    assert ok.channels == 3
    with pytest.raises(ValueError):
        ImageData(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"], "x")
    with pytest.raises(ValueError):
        ImageData(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"], "x")


# ---- the real Debian files ----------------------------------------------------------------------
_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (_DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"{_DEBIAN} absent: `sudo apt-get install dataset-fashion-mnist` to run this test",
)
def test_real_debian_fashion_mnist():
    cfg = DataConfig(dataset="fashion_mnist", root=str(_DEBIAN))
    check_data(cfg)
    tr, te = load_split(cfg, "train"), load_split(cfg, "test")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == te.images.dtype == torch.uint8
    assert torch.bincount(tr.labels, minlength=10).tolist() == [6000] * 10
    assert te.labels.min() >= 0 and te.labels.max() <= 9
    mean, std = channel_stats(tr.images)
    assert 0.27 < mean[0] < 0.30 and 0.34 < std[0] < 0.37  # the widely quoted 0.286 / 0.353
