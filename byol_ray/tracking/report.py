"""`byol-ray report <sweep>`: a sweep's MLflow runs -> the paper-shaped ablation table (Markdown, CSV, PNG).

    byol-ray report tau                    # the newest `tau` sweep in the store the preset's config uses
    byol-ray report tau run.output_dir=/data/out --run-id <parent run id>

One row per variant: mean ± std over seeds of the linear and kNN top-1 of the BYOL encoder; its gain over
the untrained encoder of the same seed (scored once per seed, a metric of the parent run); its difference
to the baseline row, paired by seed, with a 95% interval and the paired t-test (`paired.py`), resolved
when the interval excludes 0; the paper's number and difference; whether the paper's ordering holds,
checked for resolved rows only; and the trials that trained fewer steps than the sweep planned. Inputs a
sweep did not record (older sweeps) show as "-" or "not scored". The files are logged as artifacts of
the sweep's parent run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..sweep_spec import SweepSpec
from .paired import LEVEL, Paired, differences, paired, pooled_sd, resolvable_difference
from .runs import SEED_TAG, VARIANT_TAG, child_runs_frame
from .sweeps import spec_of_parent, trial_run_name
from .tracker import Tracker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LINEAR = "metrics.eval/byol/linear_top1"
KNN = "metrics.eval/byol/knn_top1"
TRAINED_STEPS = "metrics.trained_steps"  # the optimiser steps a trial trained
PLAN_WARNING = "tags.plan_warning"  # set on a trial whose plan was bad
STEPS_PARAM = "sweep.steps"  # the parent run's planned steps for every trial
# A trial's own plan: the sweep's steps, or its share of the sweep's images when the sweep holds images
# (a bigger batch trains fewer steps), so a trial is held to this, the sweep's figure only without it.
TRIAL_PLAN = "params.plan.total_steps"
UNTRAINED = re.compile(r"untrained/seed_(-?\d+)/(linear|knn)_top1")  # the parent run's per-seed metrics
# The paper reports one ImageNet run per row: differences under a point are within what reruns move, so
# they count as a tie when comparing orderings.
PAPER_TIE = 1.0


def untrained_scores(parent_metrics: Mapping[str, float]) -> pd.DataFrame:
    """The untrained encoder's linear and kNN top-1 per seed (index), from the parent run's metrics;
    empty for a sweep that did not score it."""
    rows: dict[int, dict[str, float]] = {}
    for key, value in parent_metrics.items():
        m = UNTRAINED.fullmatch(key)
        if m:
            rows.setdefault(int(m.group(1)), {})[m.group(2)] = float(value)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["linear", "knn"]).sort_index().rename_axis("seed")


def _mean_std(x: pd.Series) -> tuple[float, float]:
    x = x.dropna()
    if x.empty:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _by_seed(done: pd.DataFrame, col: str) -> dict[int, float]:
    """seed -> score of the row's finished trials (the newest run of a seed, as MLflow lists them first)."""
    out: dict[int, float] = {}
    for seed, value in zip(pd.to_numeric(done[f"tags.{SEED_TAG}"], errors="coerce"), done[col]):
        if not (math.isnan(seed) or math.isnan(value)):
            out.setdefault(int(seed), float(value))
    return out


def _stats(prefix: str, p: Paired) -> dict[str, float]:
    """`prefix` (the mean), `prefix_lo`, `_hi`, `_p` and `_seeds` (the pairs)."""
    return {
        prefix: p.mean,
        f"{prefix}_lo": p.lo,
        f"{prefix}_hi": p.hi,
        f"{prefix}_p": p.p_value,
        f"{prefix}_seeds": p.n,
    }


def _under_plan(done: pd.DataFrame, sweep_steps: float | None) -> list[str]:
    """The row's finished trials that trained fewer steps than planned or carry a plan warning, described."""
    out = []
    for _, r in done.iterrows():
        planned = sweep_steps
        why = []
        steps = r[TRAINED_STEPS]
        own = pd.to_numeric(r[TRIAL_PLAN], errors="coerce")
        if not pd.isna(own):
            planned = float(own)
        if planned is not None and math.isnan(steps):
            why.append(f"trained steps not logged, {planned:.0f} planned")
        elif planned is not None and steps < planned:
            why.append(f"trained {steps:.0f} of {planned:.0f} steps")
        if isinstance(r[PLAN_WARNING], str) and r[PLAN_WARNING]:
            why.append(f"plan_warning: {r[PLAN_WARNING]}")
        if why:
            if r["tags.collapsed"] == "true":
                why.append("collapsed")
            out.append(f"{trial_run_name(r[f'tags.{VARIANT_TAG}'], r[f'tags.{SEED_TAG}'])} ({'; '.join(why)})")
    return out


def _order(delta: float, margin: float) -> str:
    if math.isnan(delta) or math.isnan(margin):
        return "?"
    return "below" if delta < -margin else "above" if delta > margin else "tie"


def _verdict(variant: str, spec: SweepSpec, delta: Paired) -> str:
    if variant == spec.baseline:
        return "baseline"
    return "n/a" if delta.resolved is None else "yes" if delta.resolved else "no"


def _holds(row: pd.Series) -> str:
    """Whether the paper's ordering holds: checked only where our difference is resolved."""
    if row["resolved"] == "baseline":
        return "baseline"
    if row["paper_order"] == "?":
        return "no paper number"
    if row["resolved"] == "n/a":
        return "n/a (needs 2+ seeds)"
    if row["resolved"] == "no":
        return "unresolved"
    return "yes" if row["ours_order"] == row["paper_order"] else "no"


def ablation_table(
    runs: pd.DataFrame, spec: SweepSpec, untrained: pd.DataFrame | None = None, planned_steps: float | None = None
) -> pd.DataFrame:
    """One row per variant in the sweep file's order; numbers only from FINISHED trials.

    `untrained`: `untrained_scores` of the parent run; `planned_steps`: its `sweep.steps`. Without them
    (an older sweep) the gains are NaN and the under-plan count is NaN unless a trial carries a plan
    warning."""
    if runs.empty:
        runs = pd.DataFrame(columns=[f"tags.{VARIANT_TAG}", "status", LINEAR, KNN])
    runs = runs.copy()
    cols = [LINEAR, KNN, TRAINED_STEPS, TRIAL_PLAN, "metrics.collapsed", f"tags.{SEED_TAG}", PLAN_WARNING]
    for col in (*cols, "tags.collapsed", "tags.stopped"):
        if col not in runs:
            runs[col] = math.nan
    if untrained is None:
        untrained = pd.DataFrame(columns=["linear", "knn"])
    plan_known = planned_steps is not None or runs[PLAN_WARNING].notna().any()
    finished = runs[runs["status"] == "FINISHED"]
    base_lin = _by_seed(finished[finished[f"tags.{VARIANT_TAG}"] == spec.baseline], LINEAR)
    rows: list[dict[str, Any]] = []
    deltas: list[Paired] = []
    for v in spec.variants:
        r = runs[runs[f"tags.{VARIANT_TAG}"] == v.name]
        done = r[r["status"] == "FINISHED"]
        lin, knn = _by_seed(done, LINEAR), _by_seed(done, KNN)
        lin_m, lin_s = _mean_std(done[LINEAR])
        knn_m, knn_s = _mean_std(done[KNN])
        # The tag is set by the driver at the end; the per-epoch metric survives a trial cut short.
        collapsed = int(((r["tags.collapsed"] == "true") | (r["metrics.collapsed"] == 1.0)).sum())
        if v.name == spec.baseline:
            delta = Paired(len(lin), 0.0, math.nan, math.nan, math.nan)
        else:
            delta = paired(differences(lin, base_lin))
            if not collapsed:
                deltas.append(delta)
        short = _under_plan(done, planned_steps)
        rows.append(
            {
                "variant": v.name,
                "seeds": int(done[LINEAR].notna().sum()),
                "trials": len(r),
                "finished": len(done),
                "linear_mean": lin_m,
                "linear_std": lin_s,
                "knn_mean": knn_m,
                "knn_std": knn_s,
                **_stats("gain_linear", paired(differences(lin, untrained["linear"].dropna().to_dict()))),
                **_stats("gain_knn", paired(differences(knn, untrained["knn"].dropna().to_dict()))),
                **_stats("delta", delta),
                "delta_sd": delta.sd,
                "resolved": _verdict(v.name, spec, delta),
                "collapsed": collapsed,
                "stopped_early": int(r["tags.stopped"].notna().sum()),
                "under_plan": len(short) if plan_known else math.nan,
                "under_plan_trials": "; ".join(short),
                "paper": v.paper if v.paper is not None else math.nan,
            }
        )
    t = pd.DataFrame(rows)
    # What the sweep can resolve: the half-width of a row's interval at the pooled sd of the rows' paired
    # differences to the baseline, with as many seeds as the sweep has. A row with a collapsed trial is left
    # out: its spread is where each seed happened to collapse, not the noise of a variant that trains, and
    # one such row would hide what the others can resolve.
    t["pooled_delta_sd"] = pooled_sd(deltas)
    t["resolvable_delta"] = resolvable_difference(pooled_sd(deltas), len(spec.seeds))
    b = t[t["variant"] == spec.baseline].iloc[0]
    pb = spec.paper_baseline if spec.paper_baseline is not None else b["paper"]
    t["paper_delta"] = t["paper"] - pb
    t["ours_order"] = [
        "unresolved" if res in ("no", "n/a") else _order(d, 0.0) for d, res in zip(t["delta"], t["resolved"])
    ]
    t["paper_order"] = [_order(d, PAPER_TIE) for d in t["paper_delta"]]
    t["ordering_holds"] = t.apply(_holds, axis=1)
    return t


def _num(x: float, fmt: str = "+.2f") -> str:
    return "-" if math.isnan(x) else format(x, fmt)


def _pm(m: float, s: float) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}"


def _ci(r: pd.Series, prefix: str, absent: str = "-") -> str:
    """`+2.00 [-0.48, +4.48]`; the mean alone with one seed; `absent` with none."""
    if math.isnan(r[prefix]):
        return absent
    if math.isnan(r[f"{prefix}_lo"]):
        return _num(r[prefix])
    return f"{_num(r[prefix])} [{_num(r[f'{prefix}_lo'])}, {_num(r[f'{prefix}_hi'])}]"


def _p(p: float) -> str:
    return "-" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def header(t: pd.DataFrame, spec: SweepSpec) -> str:
    """The line above the table: what every column means, and the smallest difference it resolves."""
    n = len(spec.seeds)
    res = t["resolvable_delta"].iloc[0]
    smallest = (
        f"smallest resolvable Δ with {n} seeds: ±{res:.2f} points (t({0.5 + LEVEL / 2:g}, {n - 1}) × pooled sd "
        f"of the paired differences of the rows without a collapse, {t['pooled_delta_sd'].iloc[0]:.2f}, / √{n})"
        if not math.isnan(res)
        else "smallest resolvable Δ: n/a (needs 2+ seeds in 2+ rows)"
    )
    return (
        f"**{spec.ablation}** (sweep `{spec.name}`, baseline `{spec.baseline}`; ours: mean ± std over seeds; "
        f"gain and Δ: mean over seeds of the paired per-seed difference [{LEVEL:.0%} CI], resolved when the "
        f"CI excludes 0, p from the paired t-test; {smallest}; the paper's difference counts beyond "
        f"{PAPER_TIE:g} point; ordering checked for resolved rows only)"
    )


def untrained_line(untrained: pd.DataFrame) -> str:
    if untrained.empty:
        return "Untrained encoder: not scored in this sweep (gain vs untrained: not scored)."
    seeds = ", ".join(
        f"seed {s}: {_num(r['linear'], '.2f')} / {_num(r['knn'], '.2f')}" for s, r in untrained.iterrows()
    )
    return f"Untrained encoder, linear / kNN top-1, scored once per seed: {seeds}."


def under_plan_line(t: pd.DataFrame, planned_steps: float | None) -> str:
    if t["under_plan"].isna().all():
        return "Under plan: not scored (the sweep recorded no step plan)."
    plan = f"their planned steps (the sweep's {planned_steps:.0f})" if planned_steps is not None else "their plan"
    trials = "; ".join(x for x in t["under_plan_trials"] if x)
    if not trials:
        return f"Under plan: none; every trial trained {plan}."
    return f"Under plan (trained fewer than {plan}, or plan_warning set; their numbers are in the row): {trials}."


def to_markdown(
    t: pd.DataFrame, spec: SweepSpec, untrained: pd.DataFrame | None = None, planned_steps: float | None = None
) -> str:
    head = (
        "| variant | seeds | linear top-1 | kNN top-1 | gain vs untrained (linear) | Δ linear [95% CI] | p | "
        "resolved | paper | paper Δ | our order vs paper's | ordering holds | under plan | collapsed |"
    )
    untrained = untrained if untrained is not None else pd.DataFrame(columns=["linear", "knn"])
    lines = [header(t, spec), "", untrained_line(untrained), "", head, "|" + "---|" * 14]
    for _, r in t.iterrows():
        under = "-" if math.isnan(r["under_plan"]) else f"{r['under_plan']:.0f}/{r['finished']}"
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {_pm(r['linear_mean'], r['linear_std'])} | "
            f"{_pm(r['knn_mean'], r['knn_std'])} | {_ci(r, 'gain_linear', 'not scored' if untrained.empty else '-')} | "
            f"{_ci(r, 'delta')} | {_p(r['delta_p'])} | {r['resolved']} | "
            f"{_num(r['paper'], '.1f')} | {_num(r['paper_delta'])} | "
            f"{r['ours_order']} / {r['paper_order']} | {r['ordering_holds']} | {under} | "
            f"{r['collapsed']}/{r['trials']} |"
        )
    lines += ["", under_plan_line(t, planned_steps)]
    return "\n".join(lines) + "\n"


def csv_frame(t: pd.DataFrame, untrained: pd.DataFrame) -> pd.DataFrame:
    """The table as the CSV holds it: the variant rows (`kind` variant), then one row per seed of the
    untrained encoder (`kind` untrained, its scores as linear_mean and knn_mean)."""
    u = pd.DataFrame(
        {
            "variant": [f"untrained encoder, seed {s}" for s in untrained.index],
            "kind": "untrained",
            "seed": list(untrained.index),
            "seeds": 1,
            "trials": 0,
            "linear_mean": untrained["linear"].to_numpy(),
            "knn_mean": untrained["knn"].to_numpy(),
        }
    )
    out = pd.concat([t.assign(kind="variant"), u] if len(u) else [t.assign(kind="variant")], ignore_index=True)
    # Counts stay integers, blank on the untrained rows.
    ints = [c for c in out if c in t and pd.api.types.is_integer_dtype(t[c])] + (["seed"] if len(u) else [])
    return out.astype(dict.fromkeys(ints, "Int64"))


def plot(t: pd.DataFrame, spec: SweepSpec, path: Path, untrained: pd.DataFrame | None = None) -> Figure:
    """Linear top-1 with each seed's untrained encoder marked, Δ to the baseline with its 95% CI, and the
    paper's numbers when the sweep has any. Returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_paper = bool(t["paper"].notna().any())
    n = len(t)
    fig, axes = plt.subplots(1, 3 if with_paper else 2, figsize=(16 if with_paper else 11, 0.45 * n + 2.2), sharey=True)
    ax1, ax2 = axes[0], axes[1]
    y = list(range(n))[::-1]
    colors = [
        "tab:red" if c else ("tab:gray" if v == spec.baseline else "tab:blue")
        for c, v in zip(t["collapsed"], t["variant"])
    ]
    bars = ax1.barh(y, t["linear_mean"].fillna(0), xerr=t["linear_std"].fillna(0), color=colors, capsize=3)
    for bar, short in zip(bars, t["under_plan"].fillna(0)):
        if short:
            bar.set_hatch("//")
    ax1.set_yticks(y, t["variant"])
    ax1.set_xlabel("linear top-1 (%), this sweep, mean ± std over seeds")
    ax1.axvline(t.loc[t["variant"] == spec.baseline, "linear_mean"].iloc[0], color="k", lw=0.8, ls="--")
    seen = list(t["linear_mean"].dropna())
    scores = untrained["linear"].dropna() if untrained is not None else pd.Series(dtype=float)
    for score in scores:
        ax1.axvline(score, color="tab:green", lw=0.8, ls=":")
        seen.append(score)
    if len(scores):
        # One label for all the lines: the seeds' untrained encoders often score within a point of each other.
        label = f"untrained, seed{'s' if len(scores) > 1 else ''} {', '.join(str(s) for s in scores.index)}"
        ax1.annotate(label, (scores.min(), n - 0.5), rotation=90, fontsize=7, color="tab:green", va="top", ha="right")
    if seen:
        ax1.set_xlim(max(0.0, min(seen) - 5), min(100.0, max(seen) + 3))
    # Δ to the baseline with its CI: filled where the interval excludes 0, hollow where it does not.
    ci = (t["delta"] - t["delta_lo"]).fillna(0)
    for res, face in (("yes", "tab:blue"), ("no", "white"), ("n/a", "white"), ("baseline", "tab:gray")):
        m = (t["resolved"] == res).to_numpy()
        yy = [yi for yi, k in zip(y, m) if k]
        ax2.errorbar(t["delta"][m], yy, xerr=ci[m], fmt="o", mfc=face, mec="k", ecolor="k", capsize=3)
    ax2.axvline(0, color="k", lw=0.8, ls="--")
    res_d = t["resolvable_delta"].iloc[0]
    if not math.isnan(res_d):
        ax2.axvspan(-res_d, res_d, color="tab:gray", alpha=0.15, lw=0)
    ax2.set_xlabel(f"Δ linear top-1 vs baseline, paired by seed, {LEVEL:.0%} CI (band: smallest resolvable)")
    if with_paper:
        ax3 = axes[2]
        ax3.barh(y, t["paper"].fillna(0), color="tab:orange")
        ax3.set_xlabel("linear top-1 (%), paper (ImageNet, 300 epochs)")
        if spec.paper_baseline is not None:
            ax3.axvline(spec.paper_baseline, color="k", lw=0.8, ls="--")
    fig.suptitle(
        f"{spec.ablation}: red = collapsed, grey = baseline, hatched = a trial under plan, green dotted = "
        "untrained encoder per seed; Δ filled = resolved"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def parent_inputs(tracker: Tracker) -> tuple[pd.DataFrame, float | None]:
    """The parent run's untrained scores per seed and planned steps (None when it has none)."""
    data = tracker.client.get_run(tracker.run_id).data
    steps = data.params.get(STEPS_PARAM)
    return untrained_scores(data.metrics), float(steps) if steps not in (None, "", "None") else None


def build_report(tracker: Tracker, out_dir: Path) -> dict[str, Any]:
    """Build the table from the parent run's children, write it, log it to the parent run, print it."""
    spec = spec_of_parent(tracker)
    untrained, planned = parent_inputs(tracker)
    table = ablation_table(child_runs_frame(tracker.uri, tracker.run_id), spec, untrained, planned)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / f"{spec.name}_table.md",
        "csv": out_dir / f"{spec.name}_table.csv",
        "png": out_dir / f"{spec.name}_table.png",
    }
    md = to_markdown(table, spec, untrained, planned)
    files["markdown"].write_text(md)
    csv_frame(table, untrained).to_csv(files["csv"], index=False)
    plot(table, spec, files["png"], untrained)
    for f in files.values():
        tracker.log_artifact(f)
    print("\n" + md, flush=True)
    print(
        f"[report] written to {files['markdown']}, {files['csv']} and {files['png']}; logged to MLflow run "
        f"{tracker.run_id}",
        flush=True,
    )
    return {"table": table, "untrained": untrained, "files": files, "markdown": md, "parent_run_id": tracker.run_id}
