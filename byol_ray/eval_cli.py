"""``byol-ray eval {linear,semi,transfer}``: the paper's evaluation suite for one pretrained encoder.

    byol-ray eval linear   --encoder outputs/ray_results/byol-fmnist/checkpoint_...
    byol-ray eval semi     --encoder runs:/<run id>/encoder --fractions 0.01,0.1
    byol-ray eval transfer --encoder outputs/ray_results/byol-fmnist --dataset digits

``--encoder`` is a Ray Train checkpoint directory (or the run folder holding them: the newest is used)
or an MLflow model URI (``runs:/<id>/encoder``, ``models:/...``) logged by the pretraining driver. Every
protocol scores the BYOL encoder and an untrained encoder of the same architecture (seeded) with the
same code on the same data, and prints a table shaped like the paper's tables 1-3 with the difference.

The evaluation runs in-process, or as one Ray task with ``--cpus``/``--gpus`` when given ``--address``
or ``--ray``. The driver alone writes to MLflow (one writer): a child run of the pretraining run, in its
experiment, with the protocol's params, metrics and the table (Markdown + CSV) as artifacts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .config import Config, ConfigError
from .errors import UserError, run_cli
from .tracking import RUN_NAME_TAG, Tracker, check_reachable, resolve_tracking_uri

PROTOCOLS = ("linear", "semi", "transfer")
BYOL_ROW = "BYOL"
# The paper's ImageNet ResNet-50 numbers (recipe file): the shape of the comparison, not comparable values.
PAPER = "paper: BYOL ResNet-50, ImageNet (reference)"


@dataclass
class EncoderRef:
    """Where an encoder comes from and what it was trained with; plain data, so it can go to a Ray task."""

    source: str  # as the user gave it
    kind: str  # "checkpoint" | "mlflow"
    location: str  # checkpoint directory, or model URI
    config: dict  # the pretraining config
    parent_run_id: str  # the pretraining MLflow run ('' if unknown)
    tracking_uri: str
    output_dir: str


# ---- finding and loading encoders -----------------------------------------------------------------
def resolve_encoder(spec: str, tracking_uri: str = "", output_dir: str = "") -> EncoderRef:
    """Locate the encoder and its pretraining config and run id (cheap: weights are loaded later)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:/", spec) and not Path(spec).exists():
        return _resolve_mlflow(spec, tracking_uri, output_dir)
    return _resolve_checkpoint(spec, tracking_uri, output_dir)


def _resolve_checkpoint(spec: str, tracking_uri: str, output_dir: str) -> EncoderRef:
    from .checkpoint import STATE_FILE, latest_checkpoint, load_state

    d = Path(spec).expanduser().resolve()
    if d.is_dir() and not (d / STATE_FILE).is_file():
        d = latest_checkpoint(d) or d  # a run folder: its newest checkpoint
    if not (d / STATE_FILE).is_file():
        raise UserError(
            f"--encoder {spec}: no {STATE_FILE} there and no checkpoint_* folder holding one. Pass a "
            f"checkpoint directory (<output_dir>/ray_results/<run name>/checkpoint_*), the run folder "
            f"above them, or an MLflow model URI (runs:/<run id>/encoder)."
        )
    state = load_state(d)
    cfg = Config.from_dict(state["config"])
    # <output_dir>/ray_results/<name>/checkpoint_*: evaluations land next to the pretraining run.
    default_out = d.parent.parent.parent if d.parent.parent.name == "ray_results" else cfg.output_dir
    out = Path(output_dir).resolve() if output_dir else default_out
    uri = tracking_uri or _default_uri(cfg, out)
    return EncoderRef(spec, "checkpoint", str(d), cfg.to_dict(), str(state.get("mlflow_run_id", "")), uri, str(out))


def _default_uri(cfg: Config, out: Path) -> str:
    return resolve_tracking_uri(cfg.replace({"run.output_dir": str(out), "tracking.tracking_uri": ""}))


def _resolve_mlflow(uri: str, tracking_uri: str, output_dir: str) -> EncoderRef:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    out = Path(output_dir or Config().run.output_dir).resolve()
    tracking = tracking_uri or resolve_tracking_uri(Config().replace({"run.output_dir": str(out)}))
    check_reachable(tracking)
    client = MlflowClient(tracking_uri=tracking)
    try:
        run_id = _model_run_id(client, uri)
        cfg_path = client.download_artifacts(run_id, "config.json")
    except MlflowException as e:
        raise UserError(
            f"--encoder {uri}: cannot find this model or its run's config.json in the MLflow store "
            f"{tracking} ({str(e).splitlines()[0]}). Check the URI and --tracking-uri."
        ) from None
    cfg = Config.from_dict(json.loads(Path(cfg_path).read_text()))
    return EncoderRef(uri, "mlflow", uri, cfg.to_dict(), run_id, tracking, str(out))


def _model_run_id(client, uri: str) -> str:
    """The run that logged the model behind runs:/<id>/..., models:/m-<id>, models:/<name>/<version|@alias>."""
    m = re.match(r"^runs:/([^/]+)/", uri)
    if m:
        return m.group(1)
    m = re.match(r"^models:/([^/@]+)(?:/([^/]+)|@(.+))?$", uri)
    if not m:
        raise UserError(f"--encoder {uri}: not a checkpoint folder nor a runs:/ or models:/ MLflow URI")
    name, version, alias = m.groups()
    if version is None and alias is None:  # MLflow 3 logged model id (what log_model returns)
        return client.get_logged_model(name).source_run_id
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return mv.run_id


def load_encoder(ref: EncoderRef):
    """(the pretrained encoder as a trainable module, its input channels)."""
    from .model import OnlineNetwork, build_encoder

    cfg = Config.from_dict(ref.config)
    if ref.kind == "checkpoint":
        from .checkpoint import load_state

        state = load_state(ref.location)
        channels = int(state["in_channels"])
        online = OnlineNetwork(cfg.model, channels)
        online.load_state_dict(state["trainer"]["online"])
        return online.encoder.eval(), channels
    import mlflow.pytorch

    os.environ["MLFLOW_TRACKING_URI"] = ref.tracking_uri  # load_model reads the store from here
    graph = mlflow.pytorch.load_model(ref.location)
    weights = graph.state_dict()
    channels = int(weights["conv1.weight"].shape[1])
    # The logged pt2 graph runs in eval mode only (torch.export); the same weights in the module the
    # config describes can also be fine-tuned.
    encoder = build_encoder(cfg.model, channels)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"--encoder {ref.source}: its weights do not fit the encoder of its run's "
                        f"config.json ({str(e).splitlines()[0]})") from None
    return encoder.eval(), channels


# ---- the protocols (run in-process or in a Ray task) ---------------------------------------------
def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def run_protocol(spec: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load both encoders and run one protocol; returns plain data (table, metrics, params, records)."""
    import torch

    from .evaluate import BASELINE_ROW

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
    out["params"].update({"encoder_source": ref.source, "encoder_kind": ref.kind, "protocol": spec["protocol"],
                          "seed": spec["seed"], "device": str(device), "in_channels": channels})
    out["metrics"]["eval_seconds"] = time.time() - t0
    return out


def untrained_encoder(cfg: Config, channels: int, seed: int, device):
    """The baseline: the pretrained encoder's architecture with a seeded random init."""
    import torch

    from .model import build_encoder

    torch.manual_seed(seed)
    return build_encoder(cfg.model, channels).to(device)


def _data_config(spec: dict, cfg: Config):
    o = {k: v for k, v in spec["data"].items() if v not in (None, "", 0)}
    try:
        return cfg.replace({f"data.{k}": v for k, v in o.items()}).data
    except ConfigError as e:
        raise UserError(str(e)) from None


def _load_pretraining_data(spec: dict, cfg: Config):
    from .data import channel_stats, load_split

    dcfg = _data_config(spec, cfg)
    train, test = load_split(dcfg, "train"), load_split(dcfg, "test")
    mean, std = channel_stats(train.images)
    return dcfg, train, test, mean, std


def _linear(spec, cfg, channels, encoders, device, log):
    from .evaluate import ResultTable, extract_features, knn_accuracy, linear_probe
    from .linear_eval import linear_eval

    dcfg, train, test, mean, std = _load_pretraining_data(spec, cfg)
    size = dcfg.image_size
    cols = ["top-1", "top-5", "L-BFGS probe top-1", "kNN top-1"]
    rows, params = {}, {}
    log(f"[eval linear] {dcfg.dataset}: {len(train)} train / {len(test)} test images, lr grid {spec['lrs']}, "
        f"{spec['epochs']} epochs")
    for name, enc in {**encoders, "raw pixels": None}.items():
        ftr = extract_features(enc, train.images, size, mean, std, cfg.eval.batch_size, device)
        fte = extract_features(enc, test.images, size, mean, std, cfg.eval.batch_size, device)
        sgd = linear_eval(ftr, train.labels, fte, test.labels, spec["lrs"], spec["epochs"], seed=spec["seed"], log=log)
        fast = linear_probe(ftr, train.labels, fte, test.labels, cfg.eval.linear_epochs, cfg.eval.linear_weight_decay)
        knn = knn_accuracy(ftr, train.labels, fte, test.labels, cfg.eval.knn_k, cfg.eval.knn_temperature)
        rows[name] = {"top-1": sgd["top1"], "top-5": sgd["top5"], "L-BFGS probe top-1": fast["top1"], "kNN top-1": knn}
        params[f"lr.{_slug(name)}"] = sgd["lr"]
        log(f"[eval linear] {name}: top-1 {sgd['top1']:.2f} top-5 {sgd['top5']:.2f} (lr {sgd['lr']:g}), "
            f"L-BFGS {fast['top1']:.2f}, kNN {knn:.2f}")
    table = ResultTable(f"Linear evaluation on {dcfg.dataset} (frozen encoder, top-1/top-5 %)", cols, rows,
                        main=BYOL_ROW, reference={PAPER: {"top-1": 74.3, "top-5": 91.6}},
                        notes=[f"SGD Nesterov on standardised frozen features, lr from {spec['lrs']} picked on a "
                               f"held-out 10% of train, {spec['epochs']} epochs; L-BFGS probe and kNN (k = "
                               f"{cfg.eval.knn_k}) are the pretraining monitors"])
    params.update({"dataset": dcfg.dataset, "lr_grid": spec["lrs"], "epochs": spec["epochs"]})
    return {"table": table.to_dict(), "metrics": _table_metrics(table), "params": params, "records": {}}


def _semi(spec, cfg, channels, encoders, device, log):
    from .evaluate import ResultTable
    from .finetune import balanced_subset, finetune_and_score

    dcfg, train, test, mean, std = _load_pretraining_data(spec, cfg)
    n_classes = len(train.classes)
    rows = {name: {} for name in encoders}
    params: dict[str, Any] = {"dataset": dcfg.dataset, "fractions": spec["fractions"], "subset_seed": spec["seed"],
                              "lr_grid": spec["lrs"], "batch_size": spec["batch_size"]}
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
        log(f"[eval semi] {_pct(frac)} of the labels: {len(idx)} images ({len(idx) // n_classes} per class, "
            f"seed {spec['seed']}), {steps} steps of batch {spec['batch_size']}, lr grid {spec['lrs']}")
        for name, enc in encoders.items():
            r = finetune_and_score(lambda: copy.deepcopy(enc), train.images[idx], train.labels[idx], test.images,
                                   test.labels, n_classes, dcfg.image_size, mean, std, lrs=spec["lrs"], steps=steps,
                                   val=val, batch_size=spec["batch_size"], seed=spec["seed"], device=device,
                                   channels_last=cfg.model.channels_last, log=log)
            rows[name][col] = r["top1"]
            params[f"lr.{_slug(name)}.{_slug(_pct(frac))}"] = r["lr"]
            log(f"[eval semi] {name}, {_pct(frac)} labels: test top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} "
                f"(lr {r['lr']:g})")
    cols = [f"{_pct(f)} labels top-1" for f in spec["fractions"]]
    ref = {c: v for c, v in (("1% labels top-1", 53.2), ("10% labels top-1", 68.8)) if c in cols}
    table = ResultTable(f"Semi-supervised fine-tuning on {dcfg.dataset} (encoder + linear head, test top-1 %)",
                        cols, rows, main=BYOL_ROW, reference={PAPER: ref} if ref else None,
                        notes=[f"class-balanced subsets fixed by seed {spec['seed']} (indices in subsets.json); "
                               f"SGD Nesterov, cosine, crop + flip, lr from {spec['lrs']}"])
    return {"table": table.to_dict(), "metrics": _table_metrics(table), "params": params, "records": records}


def _transfer(spec, cfg, channels, encoders, device, log):
    import numpy as np

    from .data import channel_stats
    from .evaluate import BASELINE_ROW, ResultTable, extract_features
    from .finetune import finetune_and_score
    from .linear_eval import linear_eval, regularised_linear_eval
    from .transfer import load_transfer

    size = cfg.data.image_size
    rows = {name: {} for name in encoders}
    solver = spec.get("solver", "lbfgs")
    params: dict[str, Any] = {"datasets": spec["datasets"], "solver": solver, "split_seed": spec["seed"],
                              "splits": spec.get("splits", 1), "finetune": spec["finetune"]}
    if solver == "sgd":
        params.update({"lr_grid": spec["lrs"], "epochs": spec["epochs"]})
        protocol_note = (f"linear: SGD Nesterov on standardised frozen features, lr from {spec['lrs']} picked "
                         f"on a held-out 10% of the train split, {spec['epochs']} epochs")
        hparam = "lr"
    else:
        wds = spec["wds"]
        params.update({"weight_decay_grid": f"{len(wds)} values, {wds[0]:g}..{wds[-1]:g}"})
        protocol_note = (f"linear: the paper's transfer protocol, L2-regularised logistic regression (L-BFGS) on "
                         f"standardised frozen features, the penalty picked from {len(wds)} values "
                         f"{wds[0]:g}..{wds[-1]:g} on a held-out 20% of the train split")
        hparam = "weight_decay"
    notes: list[str] = []
    cols: list[str] = []
    splits = spec.get("splits", 1)
    for ds in spec["datasets"]:
        col = f"{ds} linear top-1"
        cols.append(col)
        # A small transfer set (digits: 540 test images) moves by a point from one split to the next, and
        # the untrained baseline by more from one random init to the next (measured on 10 digits splits:
        # std 1.8-2.3 with a fresh init per split, against 0.6-1.3 for the one BYOL encoder). --splits N
        # scores N seeded splits (seed, seed+1, ...), each against its own untrained init seeded the same,
        # and reports the means.
        scores: dict[str, list[float]] = {name: [] for name in encoders}
        for k in range(splits):
            split_seed = spec["seed"] + k
            if k > 0:
                encoders[BASELINE_ROW] = untrained_encoder(cfg, channels, split_seed, device)
            train, test, adapted = load_transfer(ds, spec["data"].get("root") or "", channels, size, split_seed,
                                                 spec["data"].get("train_subset") or 0,
                                                 spec["data"].get("test_subset") or 0)
            if k == 0:
                for n in adapted:
                    log(f"[eval transfer] {n}")
                notes += adapted
                log(f"[eval transfer] {ds}: {len(train)} train / {len(test)} test images, "
                    f"{len(train.classes)} classes, {splits} split(s)")
            # The target dataset's own statistics: its pixels, not the pretraining data's, are what is normalised.
            mean, std = channel_stats(train.images)
            for name, enc in encoders.items():
                ftr = extract_features(enc, train.images, size, mean, std, cfg.eval.batch_size, device)
                fte = extract_features(enc, test.images, size, mean, std, cfg.eval.batch_size, device)
                if solver == "sgd":
                    r = linear_eval(ftr, train.labels, fte, test.labels, spec["lrs"], spec["epochs"],
                                    seed=split_seed, log=log)
                else:
                    r = regularised_linear_eval(ftr, train.labels, fte, test.labels, wds, seed=split_seed,
                                                log=lambda s: None)  # 45 lines per fit would drown the log
                scores[name].append(r["top1"])
                params[f"{hparam}.{_slug(name)}.{ds}.split{k}"] = r[hparam]
                log(f"[eval transfer] {name}, {ds} split {k + 1}/{splits} linear: top-1 {r['top1']:.2f} "
                    f"({hparam} {r[hparam]:g})")
        for name in encoders:
            rows[name][col] = float(np.mean(scores[name]))
        if splits > 1:
            main_s, base_s = scores[BYOL_ROW], scores[BASELINE_ROW]
            wins = sum(m > b for m, b in zip(main_s, base_s))
            diff = np.subtract(main_s, base_s)
            params[f"paired_diff_stderr.{ds}"] = float(np.std(diff, ddof=1) / np.sqrt(splits))
            notes.append(f"{ds}: mean of {splits} seeded train/test splits (seeds {spec['seed']}.."
                         f"{spec['seed'] + splits - 1}, each with an untrained encoder of the same seed); "
                         f"std over splits {np.std(main_s, ddof=1):.2f} (BYOL), "
                         f"{np.std(base_s, ddof=1):.2f} (untrained); paired difference {diff.mean():+.2f} "
                         f"(standard error {params[f'paired_diff_stderr.{ds}']:.2f}); BYOL ahead on {wins} of "
                         f"{splits} splits")
        if spec["finetune"]:
            fcol = f"{ds} fine-tune top-1"
            cols.append(fcol)
            steps = spec["steps"] or max(1, spec["epochs"] * len(train) // spec["batch_size"])
            for name, enc in encoders.items():
                # Mirrored digits are not digits: no flip for them.
                r = finetune_and_score(lambda: copy.deepcopy(enc), train.images, train.labels, test.images,
                                       test.labels, len(train.classes), size, mean, std, lrs=spec["ft_lrs"][:1],
                                       steps=steps, batch_size=spec["batch_size"], seed=spec["seed"],
                                       flip=ds != "digits", device=device, channels_last=cfg.model.channels_last,
                                       log=log)
                rows[name][fcol] = r["top1"]
                log(f"[eval transfer] {name}, {ds} fine-tuned: top-1 {r['top1']:.2f}")
    paper = {"cifar10 linear top-1": 91.3, "cifar100 linear top-1": 78.4}
    ref = {c: v for c, v in paper.items() if c in cols}
    table = ResultTable(f"Transfer from {cfg.data.dataset} (test top-1 %)", cols, rows, main=BYOL_ROW,
                        reference={PAPER: ref} if ref else None,
                        notes=notes + [protocol_note])
    return {"table": table.to_dict(), "metrics": _table_metrics(table), "params": params, "records": {}}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower().replace("%", "pct")).strip("_")


def _table_metrics(table) -> dict[str, float]:
    out = {f"{_slug(r)}/{_slug(c)}": v for r, row in table.rows.items() for c, v in row.items()}
    out.update({f"delta/{_slug(c)}": v for c, v in table.deltas().items()})
    return out


# ---- where it runs ----------------------------------------------------------------------------------
def run_on_ray(spec: dict[str, Any], address: str, cpus: float, gpus: float) -> dict[str, Any]:
    """One Ray task with the requested resources; checked against the cluster first (Ray would wait)."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address or None, log_to_driver=True)
        except ConnectionError as e:
            raise UserError(f"cannot connect to the Ray cluster at {address!r} ({e}). Start one with "
                            f"`ray start --head`, or drop --address to evaluate in-process.") from None
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            raise UserError(f"no node of the Ray cluster has {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
                            + " free for the evaluation task. Lower --cpus/--gpus or add a node.")
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(run_protocol)
        return ray.get(task.remote({**spec, "threads": max(1, int(cpus)), "use_gpu": gpus > 0}))
    finally:
        if started:
            ray.shutdown()


def log_to_mlflow(ref: EncoderRef, protocol: str, result: dict, files: list[Path], wall: float) -> str:
    """A child run of the pretraining run, in its experiment; returns the run id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    cfg = Config.from_dict(ref.config)
    check_reachable(ref.tracking_uri)
    client = MlflowClient(tracking_uri=ref.tracking_uri)
    parent, experiment = "", cfg.tracking.experiment
    if ref.parent_run_id:
        try:
            run = client.get_run(ref.parent_run_id)
            parent, experiment = run.info.run_id, client.get_experiment(run.info.experiment_id).name
        except MlflowException:
            print(f"[eval] the pretraining run {ref.parent_run_id} is not in {ref.tracking_uri}: logging a "
                  f"top-level run in experiment {experiment!r}", flush=True)
    run_cfg = cfg.replace({"tracking.tracking_uri": ref.tracking_uri, "tracking.experiment": experiment})
    # Its own run-name tag: train.py resumes the newest unfinished run carrying the pretraining's name.
    tracker = Tracker.start(run_cfg, tags={RUN_NAME_TAG: f"{cfg.run.name}/eval-{protocol}",
                                           "byol_ray.eval_protocol": protocol},
                            parent_run_id=parent, run_name=f"eval-{protocol}")
    try:
        tracker.log_params({f"evaluation.{k}": v for k, v in result["params"].items()})
        tracker.log_metrics({**result["metrics"], "wall_seconds": wall}, step=0)
        for f in files:
            tracker.log_artifact(f)
    except BaseException:
        tracker.end("FAILED")  # never leave a RUNNING run behind
        raise
    tracker.end("FINISHED")
    return tracker.run_id


# ---- the command --------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol-ray eval", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="protocol", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--encoder", required=True,
                        help="checkpoint dir (or the ray_results/<run> folder above them), or MLflow model URI")
    common.add_argument("--tracking-uri", default="", help="MLflow store (default: the pretraining run's)")
    common.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    common.add_argument("--output-dir", default="", help="tables go to <output-dir>/<run name>/eval_<protocol>/")
    common.add_argument("--seed", type=int, default=0, help="subsets, splits, baseline init and SGD order")
    common.add_argument("--epochs", type=int, default=30, help="linear: SGD epochs; fine-tuning: epochs when "
                        "--steps is 0")
    common.add_argument("--lrs", type=_floats, default=None, help="learning-rate grid, e.g. 0.01,0.1,1")
    common.add_argument("--dataset", dest="datasets", action="append", default=None,
                        help="linear/semi: override the pretraining dataset; transfer: the target (repeatable)")
    common.add_argument("--data-root", default="", help="folder holding the dataset files")
    common.add_argument("--train-subset", type=int, default=0, help="first N train images only (quick runs)")
    common.add_argument("--test-subset", type=int, default=0, help="first N test images only (quick runs)")
    common.add_argument("--address", default="", help="run as a Ray task on this cluster")
    common.add_argument("--ray", action="store_true", help="run as a Ray task (local Ray when no --address)")
    common.add_argument("--cpus", type=float, default=2.0, help="CPUs of the Ray task (and torch threads)")
    common.add_argument("--gpus", type=float, default=0.0, help="GPUs of the Ray task (in-process: > 0 = use CUDA)")
    common.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub.add_parser("linear", parents=[common], help="linear classifier on frozen features (top-1/top-5)")
    semi = sub.add_parser("semi", parents=[common], help="fine-tune on class-balanced label subsets")
    semi.add_argument("--fractions", type=_floats, default=[0.01, 0.1], help="label fractions, e.g. 0.01,0.1")
    semi.add_argument("--steps", type=int, default=300, help="optimiser steps per fine-tuning (0 = --epochs)")
    semi.add_argument("--batch-size", type=int, default=128)
    semi.add_argument("--holdout", type=float, default=0.05,
                      help="fraction of train held out (disjoint from the labels) to pick the lr")
    tr = sub.add_parser("transfer", parents=[common], help="linear (and fine-tuning) on another dataset")
    tr.add_argument("--solver", choices=("lbfgs", "sgd"), default="lbfgs",
                    help="lbfgs: the paper's transfer protocol (L2-regularised logistic regression, penalty "
                    "picked on held-out data); sgd: the ImageNet linear protocol (--lrs, --epochs)")
    tr.add_argument("--weight-decays", dest="wds", type=_floats, default=None,
                    help="lbfgs penalty grid (default: the paper's 45 log-spaced values 1e-6..1e5)")
    tr.add_argument("--finetune", action="store_true", help="also fine-tune encoder + head on all its labels")
    tr.add_argument("--splits", type=int, default=1,
                    help="score N seeded train/test splits and report the mean (small datasets such as digits)")
    tr.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0 = --epochs over the train split)")
    tr.add_argument("--batch-size", type=int, default=128)
    return p


DEFAULT_LRS = {"linear": [0.01, 0.1, 1.0], "semi": [0.05], "transfer": [0.01, 0.1, 1.0]}


def build_spec(args: argparse.Namespace, ref: EncoderRef) -> dict[str, Any]:
    from .linear_eval import PAPER_WEIGHT_DECAYS
    from .transfer import TRANSFER_DATASETS

    proto = args.protocol
    if proto == "transfer":
        datasets = args.datasets or ["digits"]
        bad = [d for d in datasets if d not in TRANSFER_DATASETS]
        if bad:
            raise UserError(f"unknown transfer dataset {bad[0]!r}; choose from {', '.join(TRANSFER_DATASETS)}")
    else:
        if args.datasets and len(args.datasets) > 1:
            raise UserError(f"eval {proto} takes one --dataset (the pretraining dataset by default)")
        datasets = args.datasets or []
    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if any(w < 0 for w in getattr(args, "wds", None) or []):
        raise UserError(f"--weight-decays must be >= 0, got {args.wds}")
    if getattr(args, "splits", 1) < 1:
        raise UserError(f"--splits must be >= 1, got {args.splits}")
    if any(f > 1 for f in getattr(args, "fractions", [])):
        raise UserError(f"--fractions are fractions of the labels in (0, 1], got {args.fractions}")
    return {
        "protocol": proto,
        "encoder": asdict(ref),
        "seed": args.seed,
        "epochs": args.epochs,
        "lrs": sorted(args.lrs or DEFAULT_LRS[proto]),
        # Fine-tuning in transfer uses the semi-supervised default lr.
        "ft_lrs": sorted(args.lrs or DEFAULT_LRS["semi"]),
        "datasets": datasets,
        "data": {"dataset": datasets[0] if datasets and proto != "transfer" else None, "root": args.data_root,
                 "train_subset": args.train_subset, "test_subset": args.test_subset},
        "fractions": getattr(args, "fractions", []),
        "steps": getattr(args, "steps", 0),
        "batch_size": getattr(args, "batch_size", 128),
        "holdout": getattr(args, "holdout", 0.05),
        "finetune": getattr(args, "finetune", False),
        "splits": getattr(args, "splits", 1),
        "solver": getattr(args, "solver", "sgd"),
        "wds": sorted(getattr(args, "wds", None) or PAPER_WEIGHT_DECAYS),
        "threads": max(1, int(args.cpus)),
        "use_gpu": args.gpus > 0,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        t0 = time.time()
        ref = resolve_encoder(args.encoder, args.tracking_uri, args.output_dir)
        spec = build_spec(args, ref)
        print(f"[eval] {args.protocol} evaluation of {ref.kind} {ref.location} (pretraining run "
              f"{ref.parent_run_id or 'unknown'})", flush=True)
        if args.address or args.ray:
            result = run_on_ray(spec, args.address, args.cpus, args.gpus)
        else:
            result = run_protocol(spec)
        from .evaluate import ResultTable

        table = ResultTable(**result["table"])
        wall = time.time() - t0
        cfg = Config.from_dict(ref.config)
        out_dir = Path(ref.output_dir) / cfg.run.name / f"eval_{args.protocol}"
        files = table.write(out_dir, f"eval_{args.protocol}")
        paths = [files["markdown"], files["csv"]]
        if result["records"]:
            (out_dir / "subsets.json").write_text(json.dumps(result["records"]))
            paths.append(out_dir / "subsets.json")
        print("\n" + table.to_markdown(), flush=True)
        print(f"[eval] table written to {files['markdown']} and {files['csv']} ({wall:.0f} s)", flush=True)
        if not args.no_mlflow and cfg.tracking.enabled:
            run_id = log_to_mlflow(ref, args.protocol, result, paths, wall)
            print(f"[eval] MLflow run {run_id} (child of {ref.parent_run_id or 'no run'}) at {ref.tracking_uri}",
                  flush=True)
        return 0

    return run_cli(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
