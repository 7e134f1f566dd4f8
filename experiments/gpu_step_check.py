"""On a CUDA device, check what the CPU tests can only check on CPU (run by experiments/gpu_check.sh).

    python experiments/gpu_step_check.py OUT.json

1. The batched views on CUDA equal the CPU's for the same parameters, and one TwoViews call dispatches
   at most 300 ops and no host sync (on CUDA a sync is a real device -> host copy or wait).
2. The step recorded as a CUDA graph (`Pretrainer.capture_steps`, run.compile_mode=graph) trains like
   the eager step: same losses and weights within float32 / TF32 rounding over 8 steps (3 eager warm-up
   steps, the capture, replays on new batches), the same augmentation generator state, no host sync per
   replayed step; and in bf16 it trains (finite losses).

Needs only torch (no pytest, Ray or MLflow). Exit code 0 when every check passes; the JSON says which did.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from byol_ray.config import AugmentConfig, Config
from byol_ray.core.engine import InputSpec, Pretrainer
from byol_ray.core.sync import DispatchCounter, to_host
from byol_ray.data.augment import TwoViews


def check_views(dev: torch.device) -> dict:
    # The general crop path (40 x 36 inputs, a copy per view) and the small-input one (28 px: crop matrices
    # from tables, the batch read in place by both views, matrix blur of 20 px views).
    err = 0.0
    for channels, in_size, out, shared in ((3, (40, 36), 32, False), (1, (28, 28), 20, True)):
        views = TwoViews(AugmentConfig(), out, [0.5] * channels, [0.25] * channels)
        x = torch.randint(0, 256, (512, channels, *in_size), dtype=torch.uint8)
        p = views.batched.sample_params(512, channels, in_size, torch.Generator().manual_seed(0), "cpu")
        p["jitter"][:] = True
        p["blur"][:] = True
        xs = x.float().div(255)
        xs = xs if shared else xs.repeat(2, 1, 1, 1)
        cpu = views.batched.apply(xs, p, shared=shared)
        cuda = views.batched.apply(xs.to(dev), {k: v.to(dev) for k, v in p.items()}, shared=shared)
        err = max(err, (cuda.cpu() - cpu).abs().max().item())
    two = TwoViews(AugmentConfig(), 32, [0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (512, 3, 40, 36), dtype=torch.uint8)
    g = torch.Generator(device=dev).manual_seed(0)
    xd = x.to(dev)
    two(xd, g)
    with DispatchCounter() as c:
        two(xd, g)
    torch.cuda.synchronize(dev)
    return {
        "max_abs_diff_cuda_vs_cpu": err,
        "ops": c.ops,
        "syncs": c.syncs,
        "sync_ops": dict(c.sync_by_op),
        "ok": err < 1e-4 and c.ops <= 300 and c.syncs == 0,
    }


def tiny_cfg(precision: str) -> Config:
    return Config.from_dict(
        {
            "data": {"image_size": 32},
            "model": {"width": 16, "stem": "small", "projector_hidden": 256, "predictor_hidden": 256},
            "optim": {"epochs": 2, "batch_size": 64, "warmup_epochs": 0.5, "grad_clip": 1.0},
            "run": {"device": "cuda", "precision": precision},
            "tracking": {"enabled": False},
        }
    )


def batches(n: int, dev: torch.device) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (64, 3, 36, 36), generator=g, dtype=torch.uint8).to(dev)
        y = torch.randint(0, 10, (64,), generator=g).to(dev)
        out.append([(x, y)])
    return out


def check_captured(dev: torch.device, precision: str) -> dict:
    cfg = tiny_cfg(precision)
    spec = InputSpec(3, 10, (0.5,) * 3, (0.25,) * 3)
    eager = Pretrainer(cfg, spec, steps_per_epoch=8, device=dev)
    captured = Pretrainer(cfg, spec, steps_per_epoch=8, device=dev)
    captured.capture_steps()
    steps = batches(8, dev)
    losses: dict[str, list[float]] = {"eager": [], "captured": []}
    for tr in (eager, captured):
        tr.start_epoch(0)
    for micro in steps:
        for name, tr in (("eager", eager), ("captured", captured)):
            losses[name].append(to_host(tr.train_step(micro))[0])
    assert captured.captured is not None  # capture_steps() above set it
    out = {"losses": losses, "recorded": isinstance(captured.captured.graph, torch.cuda.CUDAGraph)}
    finite = all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    out["finite"] = bool(finite)
    ok = finite
    if precision == "fp32":
        rel = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(losses["eager"], losses["captured"]))
        wdiff = max((a - b).abs().max().item() for a, b in zip(eager.online.parameters(), captured.online.parameters()))
        same_gen = torch.equal(eager.generator.get_state(), captured.generator.get_state())
        distinct = len(set(losses["captured"])) == len(steps)
        out.update(
            max_rel_loss_diff=rel,
            max_abs_weight_diff=wdiff,
            same_generator_state=same_gen,
            replays_see_new_batches=distinct,
        )
        ok = ok and rel < 1e-2 and wdiff < 1e-2 and same_gen and distinct
    with DispatchCounter() as c:
        captured.train_step(steps[0])
    torch.cuda.synchronize(dev)
    out.update(replay_ops=c.ops, replay_syncs=c.syncs, replay_sync_ops=dict(c.sync_by_op))
    out["ok"] = bool(ok and out["recorded"] and c.syncs == 0)
    return out


def main() -> int:
    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("gpu_step_check.json")
    dev = torch.device("cuda", 0)
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(dev)}
    for name, fn in (
        ("views", lambda: check_views(dev)),
        ("captured_fp32", lambda: check_captured(dev, "fp32")),
        ("captured_bf16", lambda: check_captured(dev, "bf16")),
    ):
        t0 = time.time()
        try:
            res[name] = fn()
        except Exception as e:  # every check runs; the failure is in the JSON
            res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        res[name]["seconds"] = round(time.time() - t0, 1)
        print(name, json.dumps({k: v for k, v in res[name].items() if k != "traceback"}), flush=True)
    out_path.write_text(json.dumps(res, indent=2))
    return 0 if all(res[k]["ok"] for k in ("views", "captured_fp32", "captured_bf16")) else 1


if __name__ == "__main__":
    sys.exit(main())
