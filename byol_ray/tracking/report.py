"""`byol-ray report <sweep>`: a sweep's MLflow runs -> the paper-shaped ablation table (Markdown, CSV, PNG).

    byol-ray report tau                    # the newest `tau` sweep in the store the preset's config uses
    byol-ray report tau run.output_dir=/data/out --run-id <parent run id>

One row per variant: mean +- std over seeds of the linear and kNN top-1 of the BYOL encoder, the delta to
the sweep's baseline row, the paper's number and delta for that row, and whether the paper's ordering
holds here. The files are logged as artifacts of the sweep's parent run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..sweep_spec import SweepSpec
from .runs import VARIANT_TAG, child_runs_frame
from .sweeps import spec_of_parent
from .tracker import Tracker

LINEAR = "metrics.eval/byol/linear_top1"
KNN = "metrics.eval/byol/knn_top1"
# The paper reports one ImageNet run per row: differences under a point are within what reruns move, so
# they count as a tie when comparing orderings.
PAPER_TIE = 1.0
# Ours: a difference counts when it exceeds twice the seed-to-seed standard deviation (pooled over the
# two rows compared), so that the noise of a random initialisation alone does not decide an ordering.
SIGMAS = 2.0


def _mean_std(x: pd.Series) -> tuple[float, float]:
    x = x.dropna()
    if x.empty:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _order(delta: float, margin: float) -> str:
    if math.isnan(delta) or math.isnan(margin):
        return "?"
    return "below" if delta < -margin else "above" if delta > margin else "tie"


def ablation_table(runs: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """One row per variant in the sweep file's order; numbers only from FINISHED trials."""
    if runs.empty:
        runs = pd.DataFrame(columns=[f"tags.{VARIANT_TAG}", "status", LINEAR, KNN])
    for col in (LINEAR, KNN, "tags.collapsed", "tags.stopped", "metrics.collapsed"):
        if col not in runs:
            runs[col] = math.nan
    rows: list[dict[str, Any]] = []
    for v in spec.variants:
        r = runs[runs[f"tags.{VARIANT_TAG}"] == v.name]
        done = r[r["status"] == "FINISHED"]
        lin_m, lin_s = _mean_std(done[LINEAR])
        knn_m, knn_s = _mean_std(done[KNN])
        rows.append(
            {
                "variant": v.name,
                "seeds": int(done[LINEAR].notna().sum()),
                "trials": len(r),
                "linear_mean": lin_m,
                "linear_std": lin_s,
                "knn_mean": knn_m,
                "knn_std": knn_s,
                # The tag is set by the driver at the end; the per-epoch metric survives a trial cut short.
                "collapsed": int(((r["tags.collapsed"] == "true") | (r["metrics.collapsed"] == 1.0)).sum()),
                "stopped_early": int(r["tags.stopped"].notna().sum()),
                "paper": v.paper if v.paper is not None else math.nan,
            }
        )
    t = pd.DataFrame(rows)
    b = t[t["variant"] == spec.baseline].iloc[0]
    t["delta"] = t["linear_mean"] - b["linear_mean"]
    t["margin"] = SIGMAS * ((t["linear_std"] ** 2 + b["linear_std"] ** 2) / 2) ** 0.5
    pb = spec.paper_baseline if spec.paper_baseline is not None else b["paper"]
    t["paper_delta"] = t["paper"] - pb
    t["ours_order"] = [_order(d, m) for d, m in zip(t["delta"], t["margin"])]
    t["paper_order"] = [_order(d, PAPER_TIE) for d in t["paper_delta"]]

    def holds(row: pd.Series) -> str:
        if row["variant"] == spec.baseline:
            return "baseline"
        if row["paper_order"] == "?":
            return "no paper number"
        if row["seeds"] < 2 or b["seeds"] < 2:
            return "n/a (needs 2+ seeds)"
        return "yes" if row["ours_order"] == row["paper_order"] else "no"

    t["ordering_holds"] = t.apply(holds, axis=1)
    return t


def _pm(m: float, s: float) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}"


def _signed(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.2f}"


def to_markdown(t: pd.DataFrame, spec: SweepSpec) -> str:
    head = (
        "| variant | seeds | linear top-1 | kNN top-1 | Δ linear | paper | paper Δ | "
        "our order vs paper's | ordering holds | collapsed |"
    )
    lines = [
        f"**{spec.ablation}** (sweep `{spec.name}`, baseline `{spec.baseline}`; ours: mean ± std over "
        f"seeds; a difference counts beyond {SIGMAS:g} pooled std, the paper's beyond {PAPER_TIE:g} point)",
        "",
        head,
        "|" + "---|" * 10,
    ]
    for _, r in t.iterrows():
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {_pm(r['linear_mean'], r['linear_std'])} | "
            f"{_pm(r['knn_mean'], r['knn_std'])} | {_signed(r['delta'])} | "
            f"{'-' if math.isnan(r['paper']) else f'{r.paper:.1f}'} | {_signed(r['paper_delta'])} | "
            f"{r['ours_order']} / {r['paper_order']} | {r['ordering_holds']} | "
            f"{r['collapsed']}/{r['trials']} |"
        )
    return "\n".join(lines) + "\n"


def plot(t: pd.DataFrame, spec: SweepSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(t)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * n + 1.8), sharey=True)
    y = list(range(n))[::-1]
    colors = [
        "tab:red" if c else ("tab:gray" if v == spec.baseline else "tab:blue")
        for c, v in zip(t["collapsed"], t["variant"])
    ]
    ax1.barh(y, t["linear_mean"].fillna(0), xerr=t["linear_std"].fillna(0), color=colors, capsize=3)
    ax1.set_yticks(y, t["variant"])
    ax1.set_xlabel("linear top-1 (%), this sweep, mean ± std over seeds")
    ax1.axvline(t.loc[t["variant"] == spec.baseline, "linear_mean"].iloc[0], color="k", lw=0.8, ls="--")
    lo = t["linear_mean"].min()
    if not math.isnan(lo):
        ax1.set_xlim(max(0.0, lo - 5), min(100.0, t["linear_mean"].max() + 3))
    ax2.barh(y, t["paper"].fillna(0), color="tab:orange")
    ax2.set_xlabel("linear top-1 (%), paper (ImageNet, 300 epochs)")
    if spec.paper_baseline is not None:
        ax2.axvline(spec.paper_baseline, color="k", lw=0.8, ls="--")
    fig.suptitle(f"{spec.ablation}: red = collapsed, grey = baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(tracker: Tracker, out_dir: Path) -> dict[str, Any]:
    """Build the table from the parent run's children, write it, log it to the parent run, print it."""
    spec = spec_of_parent(tracker)
    table = ablation_table(child_runs_frame(tracker.uri, tracker.run_id), spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / f"{spec.name}_table.md",
        "csv": out_dir / f"{spec.name}_table.csv",
        "png": out_dir / f"{spec.name}_table.png",
    }
    md = to_markdown(table, spec)
    files["markdown"].write_text(md)
    table.to_csv(files["csv"], index=False)
    plot(table, spec, files["png"])
    for f in files.values():
        tracker.log_artifact(f)
    print("\n" + md, flush=True)
    print(
        f"[report] written to {files['markdown']}, {files['csv']} and {files['png']}; logged to MLflow run "
        f"{tracker.run_id}",
        flush=True,
    )
    return {"table": table, "files": files, "markdown": md, "parent_run_id": tracker.run_id}
