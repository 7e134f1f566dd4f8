"""Every value check of the config: ranges, names users type, and the rules that tie keys together.

`validate` runs on every config `Config.from_dict` builds (so on `load_config`'s result and on each
`Config.replace`), before any data, Ray or MLflow is touched. Each message names the field and the fix.
"""

from __future__ import annotations

from .coerce import build, set_dotted
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
    ConfigError,
    ConfigFields,
    RunConfig,
    ViewConfig,
)


def validate(cfg: ConfigFields) -> None:
    """Every rule that can be checked without touching data, Ray or MLflow."""
    _validate_fields(cfg)
    if cfg.on_gpu:  # the GPU recipe must hold too, though this machine may never use it
        d = cfg.to_dict()
        d["on_gpu"] = {}
        try:
            for k, v in cfg.on_gpu.items():
                set_dotted(d, k, v)
            _validate_fields(build(ConfigFields, d, ""))
        except ConfigError as e:
            raise ConfigError(f"on_gpu (the GPU recipe): {e}") from None


def _validate_fields(cfg: ConfigFields) -> None:
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
    _choice(d.loader, LOADERS, "data.loader")
    _check(
        d.loader == "dataloader" or d.stream,
        "data.loader",
        "ray_data feeds a streamed folder: set data.dataset=folder and data.stream=true with data.loader=ray_data",
    )
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
    _check_worker_range(cfg)
    _check_batch_split(cfg)
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
    _check(o.total_steps >= 0, "optim.total_steps", "must be >= 0 (0 = optim.epochs or the time budget decides)")
    _check(
        not (o.total_steps and o.time_budget_minutes),
        "optim.total_steps",
        f"fixes the steps ({o.total_steps}) while optim.time_budget_minutes={o.time_budget_minutes:g} would plan "
        f"them from a warm-up; set one of the two to 0",
    )

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
    _check(r.resize_interval_s >= 0, "run.resize_interval_s", f"must be >= 0 seconds, got {r.resize_interval_s}")
    _check(r.cpus_per_worker > 0, "run.cpus_per_worker", "must be > 0")
    _check(r.gpus_per_worker >= 0, "run.gpus_per_worker", "must be >= 0")
    _check_gpu_share(r)
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
    for phase in cfg.debug.pause_at:
        _choice(phase, PAUSE_PHASES, "debug.pause_at")
    _check(cfg.debug.pause_s >= 0, "debug.pause_s", f"must be >= 0 seconds, got {cfg.debug.pause_s}")
    _choice(r.compile_mode, COMPILE_MODES, "run.compile_mode")
    if r.compile and r.compile_mode != "networks":
        _check(
            r.device != "cpu",
            "run.compile_mode",
            f"{r.compile_mode} records the step as a CUDA graph: set run.device=cuda, or run.compile_mode=networks",
        )
        _check(
            r.max_workers == 1,
            "run.compile_mode",
            f"{r.compile_mode} records one process's step as a CUDA graph, without DDP's gradient all-reduce: "
            f"set run.num_workers=1 (one GPU), or run.compile_mode=networks",
        )


def _check_gpu_share(r: RunConfig) -> None:
    """A GPU is shared in fractions below 1 (Ray's rule), and only by runs of one worker each."""
    g = r.gpus_per_worker
    _check(
        g <= 1 or float(g).is_integer(),
        "run.gpus_per_worker",
        f"{g:g} GPUs per worker: Ray shares a GPU only in fractions below 1; ask for a fraction below 1 "
        f"(several runs on one GPU) or a whole number of GPUs",
    )
    _check(
        not (0 < g < 1 and r.max_workers > 1),
        "run.gpus_per_worker",
        f"a fraction of a GPU ({g:g}) needs run.num_workers=1, got {r.describe_workers()}: with fractions Ray may "
        f"place two workers of the run on one GPU, and NCCL cannot put two ranks of one group (the run's "
        f"workers) on the same GPU. Give each worker whole GPUs, or pack several one-worker runs per GPU (a "
        f"sweep does)",
    )


def _check_worker_range(cfg: ConfigFields) -> None:
    """run.num_workers: at least 1 worker; a [min, max] range with max >= min."""
    r = cfg.run
    shown = r.describe_workers()
    _check(r.min_workers >= 1, "run.num_workers", f"must be >= 1 worker, got {shown}")
    _check(
        r.max_workers >= r.min_workers,
        "run.num_workers",
        f"[min, max] needs max >= min, got {shown}: write [{r.max_workers}, {r.min_workers}]",
    )


def _check_batch_split(cfg: ConfigFields) -> None:
    """The global batch splits into micro-batches of at least 2 images (BatchNorm) at every group size the
    run may train at. Shares need not be equal: `training.loop.worker_share` gives the first workers one
    image more and the engine weights each micro-batch by its size, so the step's gradient is the global
    batch's mean at any size (an elastic run keeps its global batch when it resizes)."""
    o, r = cfg.optim, cfg.run
    small = [n for n in r.group_sizes if o.batch_size // (o.accumulate_steps * n) < 2]
    at = f"at size(s) {', '.join(map(str, small))} of run.num_workers {r.describe_workers()}" if r.elastic else ""
    _check(
        not small,
        "optim.batch_size",
        f"each worker's micro-batch must hold at least 2 images (BatchNorm): {o.batch_size} images over "
        f"accumulate_steps ({o.accumulate_steps}) x {r.max_workers} worker(s) leave fewer{' ' + at if at else ''}. "
        f"Raise optim.batch_size, or lower optim.accumulate_steps or the number of workers",
    )


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _check_prob(p: float, name: str) -> None:
    _check(0.0 <= p <= 1.0, name, f"a probability must be in [0, 1], got {p}")


def _check_range(r: tuple[float, float], name: str, lo: float, hi: float) -> None:
    _check(lo <= r[0] <= r[1] <= hi, name, f"expected {lo} <= low <= high <= {hi}, got {list(r)}")


def _choice(value: str, allowed: tuple[str, ...], name: str) -> None:
    _check(value in allowed, name, f"unknown value {value!r}; choose one of {', '.join(allowed)}")
