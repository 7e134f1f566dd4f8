"""The curve a sweep's budget is chosen from: the baseline row's gain over its untrained encoder against the
minutes each trial takes, one point per step count.

For each `--steps N` it runs the preset's baseline row alone as a real sweep (`run_sweep`: Ray Tune over
Ray Train trials, `--max-concurrent` at a time, the untrained encoder scored once per seed), every trial
training exactly N optimiser steps. It prints and writes (`<out>/budget_curve.md`, `.csv`, `.png`) per
point: the wall time of the sweep, the minutes one trial took (first trial start to last trial end, times
the trials run at once, over the trials), each seed's linear top-1 and untrained linear top-1, their gain,
and the seed-to-seed standard deviation of the BYOL encoder's linear top-1. `<out>/budget_curve.json` keeps
every point with its per-seed values and the overrides it ran with; `--compare OTHER.json` draws an earlier
curve (another learning rate, say) on the same plot.

    .venv/bin/python experiments/sweep_budget_curve.py --preset tau --steps 1000 2000 3500 --seeds 4 \\
        --max-concurrent 2 run.output_dir=outputs/curve
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

from byol_ray.config import load_config
from byol_ray.distributed.sweep import run_sweep
from byol_ray.sweep_spec import load_sweep
from byol_ray.tracking.client import client
from byol_ray.tracking.report import LINEAR, untrained_scores
from byol_ray.tracking.runs import SEED_TAG, child_runs_frame
from byol_ray.tracking.uri import resolve_tracking_uri


def point(preset: str, steps: int, seeds: int, concurrent: int, overrides: list[str]) -> dict:
    spec = load_sweep(preset, overrides)
    base = spec.variant(spec.baseline)
    spec = dataclasses.replace(
        spec,
        name=f"curve-{preset}-{steps}",
        variants=[base],
        seeds=list(range(seeds)),
        steps=steps,
        hold="steps",
        asha=dataclasses.replace(spec.asha, enabled=False),
    )
    t0 = time.time()
    report = run_sweep(spec, overrides, fresh=True, max_concurrent=concurrent)
    wall = time.time() - t0
    uri = resolve_tracking_uri(load_config(spec.base_config, overrides))
    parent = client(uri).get_run(report["parent_run_id"]).data
    untrained = untrained_scores(parent.metrics)["linear"].to_dict()
    kids = child_runs_frame(uri, report["parent_run_id"])
    kids = kids[kids["status"] == "FINISHED"]
    linear = {int(s): float(v) for s, v in zip(kids[f"tags.{SEED_TAG}"], kids[LINEAR])}
    span = (kids["end_time"].max() - kids["start_time"].min()).total_seconds()
    gains = {s: linear[s] - untrained[s] for s in sorted(linear) if s in untrained}
    return {
        "steps": steps,
        "sweep_minutes": wall / 60,
        "trial_minutes": span / 60 * min(concurrent, len(kids)) / max(1, len(kids)),
        "linear": linear,
        "untrained": untrained,
        "gain": gains,
        "gain_mean": statistics.mean(gains.values()) if gains else math.nan,
        "gain_min": min(gains.values()) if gains else math.nan,
        "linear_std": statistics.stdev(linear.values()) if len(linear) > 1 else math.nan,
    }


def each(values: dict, seeds: list[int], fmt: str) -> str:
    return ", ".join(format(values.get(s, math.nan), fmt) for s in seeds)


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| steps | minutes per trial | sweep minutes | linear top-1 per seed | untrained per seed | gain per seed "
        "| mean gain | smallest gain | linear std |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        seeds = sorted(r["linear"])
        lines.append(
            f"| {r['steps']} | {r['trial_minutes']:.1f} | {r['sweep_minutes']:.1f} | "
            f"{each(r['linear'], seeds, '.2f')} | {each(r['untrained'], seeds, '.2f')} | "
            f"{each(r['gain'], seeds, '+.2f')} | {r['gain_mean']:+.2f} | "
            f"{r['gain_min']:+.2f} | {r['linear_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def label(overrides: list[str]) -> str:
    return " ".join(overrides) or "the base config"


def plot(curves: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, rows) in enumerate(curves):
        color = f"C{i}"  # matplotlib's colour cycle: dots, line and label of one curve share it
        for r in rows:
            ax.scatter([r["trial_minutes"]] * len(r["gain"]), list(r["gain"].values()), color=color, s=14)
        minutes = [r["trial_minutes"] for r in rows]
        ax.plot(minutes, [r["gain_mean"] for r in rows], color=color, marker="o", label=name)
        for r in rows:
            ax.annotate(
                f"{r['steps']} steps",
                (r["trial_minutes"], r["gain_mean"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
    ax.axhline(2.0, color="k", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("minutes per trial")
    ax.set_ylabel("linear top-1 gain over the untrained encoder (points)")
    ax.set_title("Baseline row: gain per seed (dots) and mean (line)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tau", help="the sweep whose baseline row and base config are measured")
    p.add_argument("--steps", type=int, nargs="*", default=[], help="optimiser steps per trial, one point each")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--out", default="outputs/budget_curve")
    p.add_argument("--compare", nargs="*", default=[], help="budget_curve.json files of earlier curves to draw too")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every trial")
    args = p.parse_intermixed_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = [json.loads(Path(f).read_text()) for f in args.compare]  # read now: a bad path fails before the runs
    if not args.steps and not earlier:
        p.error("give --steps to measure, or --compare curves to draw")
    rows = []
    for steps in args.steps:
        rows.append(point(args.preset, steps, args.seeds, args.max_concurrent, args.overrides))
        md = to_markdown(rows)
        (out / "budget_curve.md").write_text(md)  # after every point: a long run shows its progress
        print("\n" + md, flush=True)
    curves = [(label(e["overrides"]), e["points"]) for e in earlier]
    if rows:
        pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]).to_csv(
            out / "budget_curve.csv", index=False
        )
        (out / "budget_curve.json").write_text(json.dumps({"overrides": args.overrides, "points": rows}, indent=1))
        curves.insert(0, (label(args.overrides), rows))
    plot(curves, out / "budget_curve.png")
    print(f"[curve] written to {out}/budget_curve{'.md, .csv, .json and ' if rows else ''}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
