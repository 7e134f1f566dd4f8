"""The three protocols of ``byol-ray eval``: linear, semi-supervised and transfer.

Each takes a plain-data spec (built by ``cli.eval.build_spec``, so it can travel to a Ray task), scores
the BYOL encoder and an untrained encoder of the same architecture with the same code on the same data,
and returns plain data: a paper-shaped table, its metrics, the params to log and records (subsets).
"""

from __future__ import annotations

import copy
import functools
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError
from ..data.readers import channel_stats, load_split
from ..data.transfer import load_transfer
from ..errors import UserError
from .encoders import EncoderRef, load_encoder, untrained_encoder
from .finetune import FinetuneOptions, balanced_subset, finetune_and_score
from .linear import FeatureSplit, linear_eval, regularised_linear_eval
from .scoring import BASELINE_ROW, ResultTable, extract_features, knn_accuracy, linear_probe

BYOL_ROW = "BYOL"
# The paper's ImageNet ResNet-50 numbers (recipe file): the shape of the comparison, not comparable values.
PAPER = "paper: BYOL ResNet-50, ImageNet (reference)"


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def run_protocol(spec: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load both encoders and run one protocol; returns plain data (table, metrics, params, records)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("use_gpu") and not torch.cuda.is_available():
        raise UserError("--gpus asks for a GPU but no CUDA device is visible here; drop --gpus to use the CPU")
    device = torch.device("cuda" if spec.get("use_gpu") else "cpu")
    ref = EncoderRef(**spec["encoder"])
    cfg = Config.from_dict(ref.config)
    pretrained, channels = load_encoder(ref)
    encoders = {BYOL_ROW: pretrained.to(device), BASELINE_ROW: untrained_encoder(cfg, channels, spec["seed"], device)}
    fn = {"linear": _linear, "semi": _semi, "transfer": _transfer}[spec["protocol"]]
    t0 = time.time()
    out = fn(spec, cfg, channels, encoders, device, log)
    out["params"].update(
        {
            "encoder_source": ref.source,
            "encoder_kind": ref.kind,
            "protocol": spec["protocol"],
            "seed": spec["seed"],
            "device": str(device),
            "in_channels": channels,
        }
    )
    out["metrics"]["eval_seconds"] = time.time() - t0
    return out


def _data_config(spec: dict, cfg: Config):
    o = {k: v for k, v in spec["data"].items() if v not in (None, "", 0)}
    try:
        return cfg.replace({f"data.{k}": v for k, v in o.items()}).data
    except ConfigError as e:
        raise UserError(str(e)) from None


def _load_pretraining_data(spec: dict, cfg: Config):
    dcfg = _data_config(spec, cfg)
    train, test = load_split(dcfg, "train"), load_split(dcfg, "test")
    mean, std = channel_stats(train.images)
    return dcfg, train, test, mean, std


def _linear(spec, cfg, channels, encoders, device, log):
    dcfg, train, test, mean, std = _load_pretraining_data(spec, cfg)
    size = dcfg.image_size
    cols = ["top-1", "top-5", "L-BFGS probe top-1", "kNN top-1"]
    rows, params = {}, {}
    log(
        f"[eval linear] {dcfg.dataset}: {len(train)} train / {len(test)} test images, lr grid {spec['lrs']}, "
        f"{spec['epochs']} epochs"
    )
    for name, enc in {**encoders, "raw pixels": None}.items():
        ftr = extract_features(enc, train.images, size, mean, std, cfg.eval.batch_size, device)
        fte = extract_features(enc, test.images, size, mean, std, cfg.eval.batch_size, device)
        sgd = linear_eval(
            FeatureSplit(ftr, train.labels, fte, test.labels), spec["lrs"], spec["epochs"], seed=spec["seed"], log=log
        )
        fast = linear_probe(ftr, train.labels, fte, test.labels, cfg.eval.linear_epochs, cfg.eval.linear_weight_decay)
        knn = knn_accuracy(ftr, train.labels, fte, test.labels, cfg.eval.knn_k, cfg.eval.knn_temperature)
        rows[name] = {"top-1": sgd["top1"], "top-5": sgd["top5"], "L-BFGS probe top-1": fast["top1"], "kNN top-1": knn}
        params[f"lr.{_slug(name)}"] = sgd["lr"]
        log(
            f"[eval linear] {name}: top-1 {sgd['top1']:.2f} top-5 {sgd['top5']:.2f} (lr {sgd['lr']:g}), "
            f"L-BFGS {fast['top1']:.2f}, kNN {knn:.2f}"
        )
    table = ResultTable(
        f"Linear evaluation on {dcfg.dataset} (frozen encoder, top-1/top-5 %)",
        cols,
        rows,
        main=BYOL_ROW,
        reference={PAPER: {"top-1": 74.3, "top-5": 91.6}},
        notes=[
            f"SGD Nesterov on standardised frozen features, lr from {spec['lrs']} picked on a "
            f"held-out 10% of train, {spec['epochs']} epochs; L-BFGS probe and kNN (k = "
            f"{cfg.eval.knn_k}) are the pretraining monitors"
        ],
    )
    params.update({"dataset": dcfg.dataset, "lr_grid": spec["lrs"], "epochs": spec["epochs"]})
    return {"table": table.to_dict(), "metrics": _table_metrics(table), "params": params, "records": {}}


def _semi(spec, cfg, channels, encoders, device, log):
    dcfg, train, test, mean, std = _load_pretraining_data(spec, cfg)
    n_classes = len(train.classes)
    rows: dict[str, dict[str, float]] = {name: {} for name in encoders}
    params: dict[str, Any] = {
        "dataset": dcfg.dataset,
        "fractions": spec["fractions"],
        "subset_seed": spec["seed"],
        "lr_grid": spec["lrs"],
        "batch_size": spec["batch_size"],
    }
    records: dict[str, Any] = {"subset_seed": spec["seed"], "subsets": {}}
    for frac in spec["fractions"]:
        idx = balanced_subset(train.labels, frac, spec["seed"])
        val = None
        if len(spec["lrs"]) > 1:
            v = balanced_subset(train.labels, spec["holdout"], spec["seed"] + 1, exclude=idx)
            val = (train.images[v], train.labels[v])
        steps = spec["steps"] or max(1, spec["epochs"] * len(idx) // spec["batch_size"])
        col = f"{_pct(frac)} labels top-1"
        records["subsets"][str(frac)] = idx.tolist()
        params[f"subset_size.{_slug(_pct(frac))}"] = len(idx)
        params[f"steps.{_slug(_pct(frac))}"] = steps
        log(
            f"[eval semi] {_pct(frac)} of the labels: {len(idx)} images ({len(idx) // n_classes} per class, "
            f"seed {spec['seed']}), {steps} steps of batch {spec['batch_size']}, lr grid {spec['lrs']}"
        )
        options = FinetuneOptions(spec["batch_size"], spec["seed"], True, device, cfg.model.channels_last)
        for name, enc in encoders.items():
            r = finetune_and_score(
                functools.partial(copy.deepcopy, enc),
                train.images[idx],
                train.labels[idx],
                test.images,
                test.labels,
                n_classes,
                dcfg.image_size,
                mean,
                std,
                lrs=spec["lrs"],
                steps=steps,
                val=val,
                options=options,
                log=log,
            )
            rows[name][col] = r["top1"]
            params[f"lr.{_slug(name)}.{_slug(_pct(frac))}"] = r["lr"]
            log(
                f"[eval semi] {name}, {_pct(frac)} labels: test top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} "
                f"(lr {r['lr']:g})"
            )
    cols = [f"{_pct(f)} labels top-1" for f in spec["fractions"]]
    ref = {c: v for c, v in (("1% labels top-1", 53.2), ("10% labels top-1", 68.8)) if c in cols}
    table = ResultTable(
        f"Semi-supervised fine-tuning on {dcfg.dataset} (encoder + linear head, test top-1 %)",
        cols,
        rows,
        main=BYOL_ROW,
        reference={PAPER: ref} if ref else None,
        notes=[
            f"class-balanced subsets fixed by seed {spec['seed']} (indices in subsets.json); "
            f"SGD Nesterov, cosine, crop + flip, lr from {spec['lrs']}"
        ],
    )
    return {"table": table.to_dict(), "metrics": _table_metrics(table), "params": params, "records": records}


def _transfer(spec, cfg, channels, encoders, device, log):
    size = cfg.data.image_size
    rows: dict[str, dict[str, float]] = {name: {} for name in encoders}
    solver = spec.get("solver", "lbfgs")
    params: dict[str, Any] = {
        "datasets": spec["datasets"],
        "solver": solver,
        "split_seed": spec["seed"],
        "splits": spec.get("splits", 1),
        "finetune": spec["finetune"],
    }
    if solver == "sgd":
        params.update({"lr_grid": spec["lrs"], "epochs": spec["epochs"]})
        protocol_note = (
            f"linear: SGD Nesterov on standardised frozen features, lr from {spec['lrs']} picked "
            f"on a held-out 10% of the train split, {spec['epochs']} epochs"
        )
        hparam = "lr"
    else:
        wds = spec["wds"]
        params.update({"weight_decay_grid": f"{len(wds)} values, {wds[0]:g}..{wds[-1]:g}"})
        protocol_note = (
            f"linear: the paper's transfer protocol, L2-regularised logistic regression (L-BFGS) on "
            f"standardised frozen features, the penalty picked from {len(wds)} values "
            f"{wds[0]:g}..{wds[-1]:g} on a held-out 20% of the train split"
        )
        hparam = "weight_decay"
    notes: list[str] = []
    cols: list[str] = []
    splits = spec.get("splits", 1)
    for ds in spec["datasets"]:
        col = f"{ds} linear top-1"
        cols.append(col)
        # A small transfer set (digits: 540 test images) moves by a point from one split to the next, and
        # the untrained baseline's score moves more still from one random init to the next
        # (docs/benchmarks.md): one init is one draw of the baseline. --splits N
        # scores N seeded splits (seed, seed+1, ...), each against its own untrained init seeded the same
        # (for every dataset, so a second --dataset starts again from seed), and reports the means.
        scores: dict[str, list[float]] = {name: [] for name in encoders}
        for k in range(splits):
            split_seed = spec["seed"] + k
            encoders[BASELINE_ROW] = untrained_encoder(cfg, channels, split_seed, device)
            train, test, adapted = load_transfer(
                ds,
                spec["data"].get("root") or "",
                channels,
                size,
                split_seed,
                spec["data"].get("train_subset") or 0,
                spec["data"].get("test_subset") or 0,
            )
            if k == 0:
                for n in adapted:
                    log(f"[eval transfer] {n}")
                notes += adapted
                log(
                    f"[eval transfer] {ds}: {len(train)} train / {len(test)} test images, "
                    f"{len(train.classes)} classes, {splits} split(s)"
                )
            # The target dataset's own statistics: its pixels, not the pretraining data's, are what is normalised.
            mean, std = channel_stats(train.images)
            for name, enc in encoders.items():
                ftr = extract_features(enc, train.images, size, mean, std, cfg.eval.batch_size, device)
                fte = extract_features(enc, test.images, size, mean, std, cfg.eval.batch_size, device)
                if solver == "sgd":
                    r = linear_eval(
                        FeatureSplit(ftr, train.labels, fte, test.labels),
                        spec["lrs"],
                        spec["epochs"],
                        seed=split_seed,
                        log=log,
                    )
                else:
                    r = regularised_linear_eval(
                        FeatureSplit(ftr, train.labels, fte, test.labels), wds, seed=split_seed, log=lambda s: None
                    )  # 45 lines per fit would drown the log
                scores[name].append(r["top1"])
                params[f"{hparam}.{_slug(name)}.{ds}.split{k}"] = r[hparam]
                log(
                    f"[eval transfer] {name}, {ds} split {k + 1}/{splits} linear: top-1 {r['top1']:.2f} "
                    f"({hparam} {r[hparam]:g})"
                )
        for name in encoders:
            rows[name][col] = float(np.mean(scores[name]))
        if splits > 1:
            main_s, base_s = scores[BYOL_ROW], scores[BASELINE_ROW]
            wins = sum(m > b for m, b in zip(main_s, base_s))
            diff = np.subtract(main_s, base_s)
            stderr = float(np.std(diff, ddof=1) / np.sqrt(splits))
            params[f"paired_diff_stderr.{ds}"] = stderr
            notes.append(
                f"{ds}: mean of {splits} seeded train/test splits (seeds {spec['seed']}.."
                f"{spec['seed'] + splits - 1}, each with an untrained encoder of the same seed); "
                f"std over splits {np.std(main_s, ddof=1):.2f} (BYOL), "
                f"{np.std(base_s, ddof=1):.2f} (untrained); paired difference {diff.mean():+.2f} "
                f"(standard error {stderr:.2f}); BYOL ahead on {wins} of "
                f"{splits} splits"
            )
        if spec["finetune"]:
            fcol = f"{ds} fine-tune top-1"
            cols.append(fcol)
            steps = spec["steps"] or max(1, spec["epochs"] * len(train) // spec["batch_size"])
            # Mirrored digits are not digits: no flip for them.
            options = FinetuneOptions(spec["batch_size"], spec["seed"], ds != "digits", device, cfg.model.channels_last)
            for name, enc in encoders.items():
                r = finetune_and_score(
                    functools.partial(copy.deepcopy, enc),
                    train.images,
                    train.labels,
                    test.images,
                    test.labels,
                    len(train.classes),
                    size,
                    mean,
                    std,
                    lrs=spec["ft_lrs"][:1],
                    steps=steps,
                    options=options,
                    log=log,
                )
                rows[name][fcol] = r["top1"]
                log(f"[eval transfer] {name}, {ds} fine-tuned: top-1 {r['top1']:.2f}")
    paper = {"cifar10 linear top-1": 91.3, "cifar100 linear top-1": 78.4}
    ref = {c: v for c, v in paper.items() if c in cols}
    table = ResultTable(
        f"Transfer from {cfg.data.dataset} (test top-1 %)",
        cols,
        rows,
        main=BYOL_ROW,
        reference={PAPER: ref} if ref else None,
        notes=notes + [protocol_note],
    )
    return {"table": table.to_dict(), "metrics": _table_metrics(table), "params": params, "records": {}}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower().replace("%", "pct")).strip("_")


def _table_metrics(table) -> dict[str, float]:
    out = {f"{_slug(r)}/{_slug(c)}": v for r, row in table.rows.items() for c, v in row.items()}
    out.update({f"delta/{_slug(c)}": v for c, v in table.deltas().items()})
    return out
