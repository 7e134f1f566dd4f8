"""Batch inference behind ``byol-ray embed``: Ray Data reads and decodes the images in tasks, a pool of
actors (`Embedder`, each loading the encoder once, on a GPU where the cluster has any) computes the
evaluator's features with `eval.scoring.extract_features`, and the driver writes the Parquet file as the
batches arrive, with a progress line."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from ..data.readers import decode_image
from ..eval.embedding import EmbedSource, dataset_images, fit_channels
from ..eval.encoders import EncoderRef, load_encoder
from ..eval.scoring import extract_features
from .cluster import ResourceError, connect

ROWS_PER_TASK = 64  # images one read task decodes per batch


def dataset_rows(batch: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """A config's split, held in Ray's object store: the rows of these indices."""
    idx = batch["id"].astype(np.int64)
    return {"id": idx, "image": images[idx], "label": labels[idx]}


def folder_rows(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Decode a task's files: shorter side resized, centre crop (as the folder reader stores them)."""
    decoded = torch.from_numpy(np.stack([decode_image(str(p), size) for p in batch["id"]]))
    return {**batch, "image": fit_channels(decoded, channels).numpy()}


class Embedder:
    """One actor of the pool: the encoder loaded once, then features of every batch it is handed."""

    def __init__(self, ref: dict, size: int, mean: list[float], std: list[float], threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        encoder, _ = load_encoder(EncoderRef(**ref))
        self.encoder = encoder.to(self.device).eval()
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.ascontiguousarray(batch["image"]))
        with torch.no_grad():
            feats = extract_features(self.encoder, images, self.size, self.mean, self.std, len(images), self.device)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = feats.numpy().astype(np.float32)
        return out


def build_dataset(
    ref: EncoderRef, source: EmbedSource, channels: int, size: int, stats, concurrency: int, batch: int
) -> tuple[ray.data.Dataset, int, bool]:
    """(the lazy dataset of {id, [label], embedding} rows, its row count, whether the actors use GPUs)."""
    if source.kind == "dataset":
        images, labels = dataset_images(source, channels)
        reader: Any = dataset_rows
        rows = ray.data.range(len(images)).map_batches(
            reader, fn_kwargs={"images": images, "labels": labels}, batch_size=ROWS_PER_TASK, batch_format="numpy"
        )
        n = len(images)
    else:
        items = [{"id": p, **({"label": lab} if source.labels else {})} for p, lab in
                 zip(source.paths, source.labels or [0] * len(source.paths))]  # fmt: skip
        reader = folder_rows
        rows = ray.data.from_items(items).map_batches(
            reader, fn_kwargs={"size": size, "channels": channels}, batch_size=ROWS_PER_TASK, batch_format="numpy"
        )
        n = len(items)
    gpus = ray.cluster_resources().get("GPU", 0.0) >= 1
    threads = 1 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1) // max(1, concurrency)))
    embedder: Any = Embedder
    ds = rows.map_batches(
        embedder,
        fn_constructor_kwargs={
            "ref": asdict(ref),
            "size": size,
            "mean": list(stats[0]),
            "std": list(stats[1]),
            "threads": threads,
        },
        batch_size=batch,
        batch_format="numpy",
        concurrency=concurrency,
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
    )
    return ds, n, gpus


def run_embed(
    ref: EncoderRef,
    source: EmbedSource,
    channels: int,
    size: int,
    stats,
    output: Path,
    address: str = "",
    concurrency: int = 1,
    batch: int = 256,
) -> dict[str, Any]:
    """Embed every image of `source` into `output` (Parquet); returns counts and timing."""
    started = connect(address)
    try:
        cpus = ray.cluster_resources().get("CPU", 0.0)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if 1 <= gpus < concurrency:  # each actor holds a whole GPU: the rest would wait for ever
            raise ResourceError(
                f"--concurrency {concurrency} asks for {concurrency} embedding actors of one GPU each, but the Ray "
                f"cluster has {gpus:g} GPUs. Lower --concurrency to at most {int(gpus)}."
            )
        # On CPUs each actor holds one CPU and the read tasks need one more, or they would wait for ever.
        if gpus < 1 and cpus < concurrency + 1:
            raise ResourceError(
                f"--concurrency {concurrency} asks for {concurrency} embedding actor(s) of one CPU each and the "
                f"reading needs one more, but the Ray cluster has {cpus:g} CPUs. Lower --concurrency or add nodes."
            )
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come out in the source's order
        ds, n, gpus = build_dataset(ref, source, channels, size, stats, concurrency, batch)
        where = "GPUs" if gpus else "CPUs"
        print(f"[embed] {n} images ({source.description}) through {concurrency} actor(s) on {where}", flush=True)
        return write_parquet(ds, n, output)
    finally:
        if started:
            ray.shutdown()


def write_parquet(ds: ray.data.Dataset, n: int, output: Path) -> dict[str, Any]:
    """Stream the batches into one Parquet file (written beside it, renamed when whole), printing progress."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    writer: pq.ParquetWriter | None = None
    done, dim, t0, last = 0, 0, time.time(), 0.0
    try:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            emb = np.asarray(b["embedding"], dtype=np.float32)
            dim = emb.shape[1]
            cols = {"id": pa.array(b["id"].tolist())}
            if "label" in b:
                cols["label"] = pa.array(b["label"].astype(np.int64))
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
            done += len(emb)
            now = time.time()
            if now - last >= 2 or done == n:
                rate = done / max(now - t0, 1e-9)
                sys.stdout.write(f"[embed] {done}/{n} images ({100 * done / n:.0f}%), {rate:.0f} img/s\n")
                sys.stdout.flush()
                last = now
        if writer is not None:
            writer.close()
            writer = None
        os.replace(partial, output)
    finally:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
    return {"images": done, "dim": dim, "seconds": time.time() - t0, "output": str(output)}
