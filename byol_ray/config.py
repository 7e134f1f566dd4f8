"""The one configuration system: typed dataclasses, validated once, loaded from YAML plus overrides.

Everything (the CLI, the Ray Train driver, the per-worker loop, sweeps, tests) builds a `Config` through
`load_config` or `Config.from_dict`, so a bad value fails at load time with a message naming the field,
before any Ray or MLflow resource is touched.

Defaults are the paper's recipe (``../shared/byol_recipe.md``) except where a comment marked
"SMALL-DATA DEPARTURE" says why the Fashion-MNIST / 2-core default differs. The paper-faithful ImageNet
setting is ``experiments/imagenet_resnet50.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


# Names that users type; unknown names fail at load time.
AUG_OPS = ("crop", "flip", "jitter", "grayscale", "blur", "solarize")
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "small", "small_pool")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder")
OPTIMIZERS = ("lars", "sgd", "adamw")
TAU_SCHEDULES = ("cosine", "constant")
TARGET_BN_MODES = ("ema", "copy")
PRECISIONS = ("fp32", "bf16", "auto")
CRASH_KINDS = ("kill", "user_error")
COMPILE_MODES = ("networks", "graph", "step")


@dataclass
class ViewConfig:
    """One view distribution (T or T'). Each probability is per image, drawn independently."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4  # additive delta ~ U(-b, b), as in the authors' code
    contrast: float = 0.4
    saturation: float = 0.2  # no-op on 1-channel images
    hue: float = 0.1  # no-op on 1-channel images
    grayscale_prob: float = 0.2  # no-op on 1-channel images
    blur_prob: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel side = 10% of the image side
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5


def _view2_default() -> ViewConfig:
    # T' differs from T only in blur (0.1 vs 1.0) and solarize (0.2 vs 0.0).
    return ViewConfig(blur_prob=0.1, solarize_prob=0.2)


@dataclass
class AugmentConfig:
    # The ops applied, in this order; leaving one out is how the paper's "remove X" ablations are written.
    ops: list[str] = field(default_factory=lambda: list(AUG_OPS))
    # Side of the training views; 0 = data.image_size. Smaller views are cheaper per step (FLOPs scale with
    # the area) while the evaluation still embeds data.image_size images: the ResNet's global pooling takes
    # any size, and training on smaller random-resized crops than the test size is known to suit it
    # (Touvron et al. 2019, "FixRes").
    view_size: int = 0
    view1: ViewConfig = field(default_factory=ViewConfig)
    view2: ViewConfig = field(default_factory=_view2_default)


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    image_size: int = 28  # side of the views fed to the encoder
    train_subset: int = 0  # 0 = the whole train split; N = the first N images (tests, quick runs)
    test_subset: int = 0
    num_workers: int = 0  # DataLoader decode workers, only for datasets streamed from files (folder)
    # folder only: stream the train split from its files (byol_ray.pipeline) instead of decoding it all
    # into memory first; for datasets that do not fit in memory (ImageNet).
    stream: bool = False
    prefetch_batches: int = 4  # batches each DataLoader worker decodes ahead (data.stream)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    # SMALL-DATA DEPARTURE: the paper's ResNet uses the ImageNet stem (7x7/2 conv + max-pool) on 224 px.
    # On 28 px images that leaves a 7x7 map after the stem and barely beats raw pixels; "small_pool"
    # (3x3/1 conv + max-pool) keeps a 14x14 map at a quarter of the "small" stem's (3x3/1, no pool) cost.
    stem: str = "small_pool"
    # SMALL-DATA DEPARTURE: base width 64 is torchvision's ResNet; 32 quarters the FLOPs so a 2-core CPU
    # sees enough epochs in 15 minutes. 64 is the paper's.
    width: int = 32
    # 0 = the dataset's channel count. 1 or 3 pretrains an encoder of that many input channels on any
    # data (1 -> 3 repeats the grey channel, 3 -> 1 takes the luma), e.g. a 3-channel encoder from
    # Fashion-MNIST that can be evaluated on RGB datasets.
    in_channels: int = 0
    projector_hidden: int = 4096
    projector_out: int = 256
    projector_layers: int = 2
    predictor_hidden: int = 4096
    predictor_layers: int = 2
    use_predictor: bool = True
    # Each view through the encoder in its own forward pass, so BatchNorm statistics are per view as in
    # the paper. False concatenates the two views into one batch (BatchNorm then mixes the views); on the
    # 2-core reference CPU that step was 4-5% slower (README, Speed); gpu_check.sh measures it on a GPU.
    separate_view_forward: bool = True
    # What the target's BatchNorm running statistics do: "ema" averages them with the online ones like
    # the weights; "copy" copies them. The target runs in train mode (batch statistics) during
    # pretraining either way, as in the authors' code, so this only matters for using the target later.
    target_bn: str = "ema"
    sync_batchnorm: bool = True  # only applied on GPUs: SyncBatchNorm raises on CPU tensors
    # NHWC activations: oneDNN's CPU convolutions and cuDNN's tensor-core kernels are both faster on them
    # (measured 1.4-1.5x for fwd+bwd of the default encoder on this repo's 2-core CPU). Same math in fp32.
    # On a CPU it applies only where oneDNN is safe (core.model.memory_format): not at resnet18/34 width 4.
    channels_last: bool = True


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch over all workers and accumulation steps
    accumulate_steps: int = 1  # micro-batches per optimiser step (one EMA step per optimiser step)
    optimizer: str = "lars"
    base_lr: float = 0.2  # lr = base_lr * batch_size / 256
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    warmup_epochs: float = 10.0
    tau_base: float = 0.996
    tau_schedule: str = "cosine"  # "constant" keeps tau = tau_base (the paper's tau ablation)
    steps_per_epoch: int = 0  # 0 = a full pass over the data; N caps it (tests, benchmarks)
    # Minutes for the whole pretraining of a worker, from reading the data to the end of its final
    # evaluation: the run times a warm-up and plans its total steps so that the lr and tau schedules end
    # when the budget does (training/plan.py). 0 = no budget. With both, the smaller of `epochs` and what
    # fits the budget wins.
    time_budget_minutes: float = 0.0
    grad_clip: float = 0.0


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_every: int = 0  # run kNN monitoring every N epochs (0 = only at the end)
    # A linear probe on detached representations, trained during pretraining (its own Adam optimiser, no
    # gradient into the encoder): the per-epoch `online_probe_acc` monitor. False skips it.
    online_probe: bool = True
    linear_epochs: int = 100  # L-BFGS iterations of the frozen-feature probe of the end-of-run table
    linear_weight_decay: float = 1e-5
    final: bool = True  # evaluate at the end of pretraining (off for benchmarks)
    baselines: bool = True  # also score raw pixels and an untrained encoder
    batch_size: int = 512
    # Collapse monitor: when an epoch's mean representation std (engine.representation_std: ~1 spread out,
    # 0 for a constant output) falls below this, the run stops early, is evaluated and marked collapsed
    # instead of spending its remaining epochs on a dead representation. 0 turns it off.
    collapse_std: float = 0.1


@dataclass
class RunConfig:
    name: str = "byol-fmnist"
    output_dir: str = "outputs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 1  # Ray Train workers (data-parallel replicas)
    cpus_per_worker: float = 2.0
    gpus_per_worker: float = 0.0
    address: str = ""  # Ray address; "" = ray.init() default (existing cluster, else a local one)
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    max_failures: int = 2
    storage_path: str = ""  # "" = <output_dir>/ray_results (absolute)
    # The cluster adds nodes on demand (cluster.yaml): instead of failing fast when the worker group does
    # not fit the nodes running now, ask the autoscaler for it.
    autoscaling: bool = False
    log_every: int = 20  # steps between progress lines
    torch_threads: int = 0  # 0 = cpus_per_worker
    # "bf16" runs the forward passes under bf16 autocast (weights, loss, optimiser and EMA stay fp32), on
    # GPUs and on CPUs with native bf16 (AVX-512 BF16 or AMX; refused on others, where oneDNN would emulate
    # it slowly). "auto" is bf16 where the worker's device runs it natively and fp32 elsewhere (the main
    # job's choice: one config for AVX2 laptops, bf16 CPUs and GPUs). The default fp32 leaves results bit
    # for bit as they were.
    precision: str = "fp32"
    compile: bool = False  # see compile_mode (worth it on GPUs for long runs)
    # What run.compile=true does: "networks" torch.compiles the online and target networks; "graph" records
    # the whole training step (augmentation, forward, backward, LARS, probe, EMA) once as a CUDA graph and
    # replays it (no launch overhead; one GPU worker); "step" does both. GPU only for graph and step.
    compile_mode: str = "networks"


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<abs output_dir>/mlflow.db
    experiment: str = "byol-ray"
    log_model: bool = True
    # CPU, memory, disk, network (and GPU with nvidia-ml-py) of the training process's machine, sampled by
    # MLflow's own system-metrics logging into the run as system/* metrics. MLflow samples every 10 s by
    # default, which leaves a one-minute sweep trial with next to nothing; 5 s gives it a dozen points.
    system_metrics: bool = True
    system_metrics_interval_s: float = 5.0


@dataclass
class DebugConfig:
    """Fault injection for tests of the distributed machinery; all off by default."""

    perturb_target_rank: int = -1  # add noise to this rank's target at the end of epoch 0
    crash_rank: int = -1  # this rank kills its own process (SIGKILL) ...
    crash_at_step: int = -1  # ... at this global step, once (a marker file records that it happened)
    # "kill": the lost worker above (Ray restarts the group); "user_error": the rank raises a UserError at
    # that step on every try instead, as an error in the user's input would (the run ends at once).
    crash_kind: str = "kill"
    # Every training step sleeps this long, the warm-up's excepted: a machine that slows down after a
    # time-budgeted run planned (tests of re-planning).
    step_delay_s: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # A recipe for GPUs: `section.key: value` overrides that apply when the run trains on GPUs (run.device
    # cuda, or auto on a machine or cluster that has them); see `for_device`. Keys given on the command
    # line win over these. CPUs and GPUs differ ~50x in speed here, so one recipe cannot suit both.
    # Applied by core.engine.recipe_for.
    on_gpu: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Config:
        cfg = _build(cls, d or {}, "")
        validate(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (for MLflow params and sweep tables)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict) and key in _FREE_FORM:  # its overrides, each under the field's name
                    out.update({f"{key}.{kk}": vv for kk, vv in v.items()})
                elif isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out

    def replace(self, overrides: dict[str, Any]) -> Config:
        """A new validated config with dotted-key overrides applied."""
        d = self.to_dict()
        for k, v in overrides.items():
            _set_dotted(d, k, v)
        return Config.from_dict(d)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir).expanduser().resolve()


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, name + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}: expected a mapping of section.key: value, got {value!r}")
        return dict(value)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(arg, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {name}")


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'} are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for i, p in enumerate(parts[:-1]):
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])} (in override {key})")
        cur = nxt
    if parts[-1] not in cur:
        raise ConfigError(f"unknown config key {key}")
    cur[parts[-1]] = value


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _check_prob(p: float, name: str) -> None:
    _check(0.0 <= p <= 1.0, name, f"a probability must be in [0, 1], got {p}")


def _check_range(r: tuple[float, float], name: str, lo: float, hi: float) -> None:
    _check(lo <= r[0] <= r[1] <= hi, name, f"expected {lo} <= low <= high <= {hi}, got {list(r)}")


def _choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    _check(value in allowed, name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Every rule that can be checked without touching data, Ray or MLflow."""
    _validate_fields(cfg)
    if cfg.on_gpu:  # the GPU recipe must hold too, though this machine may never use it
        d = cfg.to_dict()
        d["on_gpu"] = {}
        try:
            for k, v in cfg.on_gpu.items():
                _set_dotted(d, k, v)
            _validate_fields(_build(Config, d, ""))
        except ConfigError as e:
            raise ConfigError(f"on_gpu (the GPU recipe): {e}") from None


def _validate_fields(cfg: Config) -> None:
    a = cfg.augment
    for i, op in enumerate(a.ops):
        _choice(op, AUG_OPS, f"augment.ops[{i}]")
    _check(len(set(a.ops)) == len(a.ops), "augment.ops", f"an op is listed twice: {a.ops}")
    for vname in ("view1", "view2"):
        v: ViewConfig = getattr(a, vname)
        p = f"augment.{vname}"
        _check_range(v.crop_scale, f"{p}.crop_scale", 1e-6, 1.0)
        _check_range(v.crop_ratio, f"{p}.crop_ratio", 1e-3, 1e3)
        for prob in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            _check_prob(getattr(v, prob), f"{p}.{prob}")
        for s in ("brightness", "contrast", "saturation"):
            _check(getattr(v, s) >= 0, f"{p}.{s}", f"must be >= 0, got {getattr(v, s)}")
        _check(0 <= v.hue <= 0.5, f"{p}.hue", f"must be in [0, 0.5], got {v.hue}")
        _check_range(v.blur_sigma, f"{p}.blur_sigma", 1e-6, 1e3)
        _check(0 < v.blur_kernel_frac <= 1, f"{p}.blur_kernel_frac", f"must be in (0, 1], got {v.blur_kernel_frac}")
        _check(0 <= v.solarize_threshold <= 1, f"{p}.solarize_threshold", "must be in [0, 1]")

    d = cfg.data
    _choice(d.dataset, DATASETS, "data.dataset")
    _check(bool(d.root), "data.root", "must name the folder holding the dataset files")
    _check(d.image_size >= 8, "data.image_size", f"must be >= 8 pixels, got {d.image_size}")
    _check(
        a.view_size == 0 or a.view_size >= 8,
        "augment.view_size",
        f"must be 0 (= data.image_size) or >= 8 pixels, got {a.view_size}",
    )
    _check(d.train_subset >= 0, "data.train_subset", "must be >= 0 (0 = all)")
    _check(d.test_subset >= 0, "data.test_subset", "must be >= 0 (0 = all)")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(
        not d.stream or d.dataset == "folder",
        "data.stream",
        f"only data.dataset=folder is streamed from files; {d.dataset} is read into memory (set data.stream=false)",
    )
    _check(d.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")
    _check(
        not d.stream or (not cfg.eval.final and cfg.eval.knn_every == 0),
        "data.stream",
        "the frozen-feature evaluation holds the whole train split in memory and is not streamed: with "
        "data.stream=true set eval.final=false and eval.knn_every=0, and evaluate the checkpoint afterwards",
    )

    m = cfg.model
    _choice(m.backbone, BACKBONES, "model.backbone")
    _choice(m.stem, STEMS, "model.stem")
    _choice(m.target_bn, TARGET_BN_MODES, "model.target_bn")
    _check(m.width >= 4 and m.width % 4 == 0, "model.width", f"must be a multiple of 4 >= 4, got {m.width}")
    _check(m.in_channels in (0, 1, 3), "model.in_channels", f"must be 0 (from the data), 1 or 3, got {m.in_channels}")
    _check(
        not d.stream or m.in_channels in (0, 3),
        "model.in_channels",
        "streamed folders are decoded as RGB (3 channels): set model.in_channels=0 or 3 with data.stream=true",
    )
    for k in ("projector_hidden", "projector_out", "predictor_hidden"):
        _check(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
    _check(m.projector_layers >= 1, "model.projector_layers", "must be >= 1")
    _check(m.predictor_layers >= 1, "model.predictor_layers", "must be >= 1")

    o = cfg.optim
    _check(
        o.epochs >= 1, "optim.epochs", f"must be >= 1 (a run of 0 epochs trains and evaluates nothing), got {o.epochs}"
    )
    _check(o.batch_size >= 2, "optim.batch_size", f"must be >= 2 (BatchNorm needs 2 samples), got {o.batch_size}")
    _check(o.accumulate_steps >= 1, "optim.accumulate_steps", "must be >= 1")
    _check(
        o.batch_size % (o.accumulate_steps * cfg.run.num_workers) == 0,
        "optim.batch_size",
        f"{o.batch_size} must divide evenly into accumulate_steps ({o.accumulate_steps}) x "
        f"run.num_workers ({cfg.run.num_workers}) micro-batches",
    )
    _check(
        o.batch_size // (o.accumulate_steps * cfg.run.num_workers) >= 2,
        "optim.batch_size",
        "each worker's micro-batch must hold at least 2 images (BatchNorm)",
    )
    _choice(o.optimizer, OPTIMIZERS, "optim.optimizer")
    _choice(o.tau_schedule, TAU_SCHEDULES, "optim.tau_schedule")
    _check(0.0 <= o.tau_base <= 1.0, "optim.tau_base", f"tau must be in [0, 1], got {o.tau_base}")
    _check(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    _check(o.trust_coefficient > 0, "optim.trust_coefficient", "must be > 0")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(o.steps_per_epoch >= 0, "optim.steps_per_epoch", "must be >= 0 (0 = full epoch)")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    _check(o.time_budget_minutes >= 0, "optim.time_budget_minutes", "must be >= 0 (0 = no budget)")

    e = cfg.eval
    _check(e.knn_k >= 1, "eval.knn_k", "must be >= 1")
    _check(e.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    _check(e.knn_every >= 0, "eval.knn_every", "must be >= 0")
    _check(e.linear_epochs >= 1, "eval.linear_epochs", "must be >= 1")
    _check(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(0 <= e.collapse_std < 1, "eval.collapse_std", f"must be in [0, 1) (0 = off), got {e.collapse_std}")

    _check(
        cfg.tracking.system_metrics_interval_s >= 0.5,
        "tracking.system_metrics_interval_s",
        f"must be >= 0.5 seconds, got {cfg.tracking.system_metrics_interval_s}",
    )

    r = cfg.run
    _check(bool(r.name) and "/" not in r.name, "run.name", "must be a non-empty name without '/'")
    _choice(r.device, ("auto", "cpu", "cuda"), "run.device")
    _check(r.num_workers >= 1, "run.num_workers", f"must be >= 1, got {r.num_workers}")
    _check(r.cpus_per_worker > 0, "run.cpus_per_worker", "must be > 0")
    _check(r.gpus_per_worker >= 0, "run.gpus_per_worker", "must be >= 0")
    _check(
        not (r.device == "cpu" and r.gpus_per_worker > 0),
        "run.gpus_per_worker",
        f"{r.gpus_per_worker:g} GPUs per worker with run.device=cpu: set run.device=cuda (or auto), or 0 GPUs",
    )
    _check(r.checkpoint_every >= 1, "run.checkpoint_every", "must be >= 1 epoch")
    _check(r.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
    _check(r.max_failures >= 0, "run.max_failures", "must be >= 0")
    _check(r.log_every >= 1, "run.log_every", "must be >= 1")
    _check(r.torch_threads >= 0, "run.torch_threads", "must be >= 0")
    _choice(r.precision, PRECISIONS, "run.precision")
    _choice(cfg.debug.crash_kind, CRASH_KINDS, "debug.crash_kind")
    _check(cfg.debug.step_delay_s >= 0, "debug.step_delay_s", f"must be >= 0 seconds, got {cfg.debug.step_delay_s}")
    _choice(r.compile_mode, COMPILE_MODES, "run.compile_mode")
    if r.compile and r.compile_mode != "networks":
        _check(
            r.device != "cpu",
            "run.compile_mode",
            f"{r.compile_mode} records the step as a CUDA graph: set run.device=cuda, or run.compile_mode=networks",
        )
        _check(
            r.num_workers == 1,
            "run.compile_mode",
            f"{r.compile_mode} records one process's step as a CUDA graph, without DDP's gradient all-reduce: "
            f"set run.num_workers=1 (one GPU), or run.compile_mode=networks",
        )


# ---- loading ------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, Any]:
    """'optim.epochs=3' -> ('optim.epochs', 3); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what a YAML syntax error is, in one line ('line 3, column 1: found character ...'), with
    the fix for the one mistake YAML's own words do not explain: a tab."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    if "'\\t'" in problem:
        problem += " (YAML indents with spaces only: replace the tab with spaces)"
    return where + problem


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass a YAML file such as experiments/fmnist.yaml")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file {p} is not valid YAML at {yaml_problem(e)}. Fix it there; "
            f"experiments/fmnist.yaml shows the expected layout."
        ) from None
    if d is None:
        # Not the defaults in silence: those are the paper's 100-epoch ImageNet-length schedule.
        raise ConfigError(
            f"config file {p} is empty. Put the sections to change in it (data:, model:, optim:, "
            f"...; experiments/fmnist.yaml is an example), or leave --config out to run the defaults."
        )
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
    return d


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, validated once."""
    d: dict[str, Any] = Config().to_dict()
    if path:
        _merge(d, load_yaml(path), "")
    for o in overrides or []:
        k, v = parse_override(o)
        _set_dotted(d, k, v)
        if isinstance(d.get("on_gpu"), dict):
            d["on_gpu"].pop(k, None)  # a key given on the command line wins over the GPU recipe
    return Config.from_dict(d)


_FREE_FORM = {"on_gpu"}  # mappings of overrides, taken whole from YAML


def _merge(base: dict[str, Any], new: dict[str, Any], prefix: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"unknown config key {prefix}{k}; valid keys: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and isinstance(v, dict) and f"{prefix}{k}" not in _FREE_FORM:
            _merge(base[k], v, f"{prefix}{k}.")
        else:
            base[k] = v
