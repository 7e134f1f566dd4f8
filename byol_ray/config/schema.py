"""The config's schema: every section, key and default a run has, and the names users may type.

The defaults are the paper's recipe (``docs/paper_recipe.md``) except where a comment marked
"SMALL-DATA DEPARTURE" says why the Fashion-MNIST / 2-core default differs; ``docs/benchmarks.md`` has the
figures behind each departure. The paper-faithful ImageNet setting is ``experiments/imagenet_resnet50.yaml``.

`ConfigFields` is the whole config's fields; `Config` (``load.py``) adds its construction from plain data
(built by ``coerce.py``, checked by ``validate.py``), which is why the two are separate classes: the checks
need the fields, and the construction needs the checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


# Names that users type; unknown names fail at load time.
AUG_OPS = ("crop", "flip", "jitter", "grayscale", "blur", "solarize")
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "small", "small_pool")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "folder")
LOADERS = ("dataloader", "ray_data")
OPTIMIZERS = ("lars", "sgd", "adamw")
TAU_SCHEDULES = ("cosine", "constant")
TARGET_BN_MODES = ("ema", "copy")
PRECISIONS = ("fp32", "bf16", "auto")
CRASH_KINDS = ("kill", "user_error")
# Where `debug.pause_at` holds a run, so that a test can kill its driver there (see DebugConfig).
PAUSE_PHASES = ("warmup", "mid_epoch", "checkpoint", "final_eval", "resized")
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
    # DataLoader decode workers, only for datasets streamed from files (folder); with data.loader=ray_data,
    # the most Ray Data decode tasks at once (0 = as many as the cluster's free CPUs).
    num_workers: int = 0
    # folder only: stream the train split from its files (byol_ray.pipeline) instead of decoding it all
    # into memory first; for datasets that do not fit in memory (ImageNet).
    stream: bool = False
    prefetch_batches: int = 4  # batches each DataLoader worker (or each worker's Ray Data shard) prepares ahead
    # Who decodes and crops a streamed folder: "dataloader" (torch DataLoader processes beside each
    # training worker) or "ray_data" (Ray Data tasks on any node of the cluster, CPU-only ones included;
    # needs Ray Train, see distributed/ingest.py).
    loader: str = "dataloader"


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    # SMALL-DATA DEPARTURE: the paper's ImageNet stem (7x7/2 conv + max-pool, made for 224 px) leaves a 28 px
    # image a 7x7 map, too coarse to learn from. "small_pool" (3x3/1 conv + max-pool) keeps a 14x14 map, a
    # quarter of the positions of the "small" stem's (3x3/1, no pool) 28x28. See docs/benchmarks.md.
    stem: str = "small_pool"
    # SMALL-DATA DEPARTURE: half the paper's (and torchvision's) base width of 64, a quarter of the FLOPs, so
    # a 2-core CPU trains enough epochs in a short time budget. See docs/benchmarks.md.
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
    # the paper. False concatenates the two views into one batch (one forward pass; BatchNorm then mixes the
    # views).
    separate_view_forward: bool = True
    # What the target's BatchNorm running statistics do: "ema" averages them with the online ones like
    # the weights; "copy" copies them. The target runs in train mode (batch statistics) during
    # pretraining either way, as in the authors' code, so this only matters for using the target later.
    target_bn: str = "ema"
    sync_batchnorm: bool = True  # only applied on GPUs: SyncBatchNorm raises on CPU tensors
    # NHWC activations: oneDNN's CPU convolutions and cuDNN's tensor-core kernels are both faster on them.
    # Same math in fp32. On a CPU it applies only where oneDNN is safe (core.model.memory_format): not at
    # resnet18/34 width 4.
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
    # Exactly this many optimiser steps, in place of `epochs` (the last epoch may stop part-way): a plan
    # fixed before the run, as a sweep fixes one for all its trials. 0 = `epochs` or the time budget.
    total_steps: int = 0
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
    # Ray Train workers (data-parallel replicas): a number, or [min, max] for an elastic group that starts
    # with as many as fit (at least min) and grows back to max when nodes return; each resize restarts the
    # group from the latest checkpoint. The global batch, the lr and tau schedules and the EMA stay as
    # configured at every size: each worker takes its share of the global batch (a size that does not divide
    # it gives the first workers one image more, and each share's gradient is weighted by its size), split
    # into accumulate_steps micro-batches of at least 2 images at the largest size.
    # Read it through min_workers / max_workers / elastic.
    num_workers: int | tuple[int, int] = 1
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
    # How often Ray Train checks whether an elastic group (num_workers [min, max]) can grow, and how long
    # a group runs at least before it does (Ray's ScalingConfig.elastic_resize_monitor_interval_s).
    resize_interval_s: float = 60.0
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

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (num_workers itself when it is a number)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with (num_workers itself when it is a number)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        """num_workers is a [min, max] range: Ray Train resizes the group as nodes come and go."""
        return not isinstance(self.num_workers, int)

    @property
    def group_sizes(self) -> range:
        """Every worker-group size the run may train at."""
        return range(self.min_workers, self.max_workers + 1)

    def describe_workers(self) -> str:
        """num_workers as users write it: "2", or "[1, 2]" for an elastic range."""
        return f"[{self.min_workers}, {self.max_workers}]" if self.elastic else str(self.num_workers)


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
    # Hold the run once, for pause_s seconds, at each of these phases of rank 0 (warm-up plan, the middle of
    # the second epoch, a checkpoint written but not yet handed to Ray, the final evaluation, the first
    # checkpoint of a group resized from another size), after writing the marker file
    # `<output_dir>/.paused_<run.name>_<phase>`: a test kills the driver or a node there and reruns the
    # command, which finds the marker and does not hold again.
    pause_at: list[str] = field(default_factory=list)
    pause_s: float = 0.0


# Top-level fields that hold a free-form mapping of `section.key: value` overrides rather than a section:
# taken whole from YAML, and flattened under the field's name.
FREE_FORM = {"on_gpu"}


@dataclass
class ConfigFields:
    """Every section of the config, and its plain views. Build it as `Config` (``load.py``), which adds
    `from_dict` and `replace`; this class exists apart only so that ``validate.py`` can name the fields."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    # A recipe for GPUs: `section.key: value` overrides that apply when the run trains on GPUs (run.device
    # cuda, or auto on a machine or cluster that has them). Keys given on the command line win over these.
    # A GPU is so much faster than a small CPU that one recipe cannot suit both. Applied by
    # gpu_recipe.apply_gpu_recipe.
    on_gpu: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (for MLflow params and sweep tables)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, d: dict[str, Any]) -> None:
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict) and key in FREE_FORM:  # its overrides, each under the field's name
                    out.update({f"{key}.{kk}": vv for kk, vv in v.items()})
                elif isinstance(v, dict):
                    walk(key + ".", v)
                else:
                    out[key] = v

        walk("", self.to_dict())
        return out

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir).expanduser().resolve()


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
