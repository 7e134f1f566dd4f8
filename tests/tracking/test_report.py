"""The sweep report: the table, Markdown, CSV and figure built from a runs DataFrame shaped as
`child_runs_frame` returns it (tags.*, metrics.*, status) and the parent run's metrics written by hand,
checked against hand-computed intervals; and once end to end from a real SQLite MLflow store."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from byol_ray.sweep_spec import SweepSpec, Variant
from byol_ray.tracking.paired import t_quantile
from byol_ray.tracking.report import ablation_table, csv_frame, plot, to_markdown, untrained_scores

# t(0.975, n - 1) for 2 and 3 seeds: 12.7062... and 4.302652... (checked in closed form in test_paired.py).
T1, T2 = t_quantile(2), t_quantile(3)


# ---- the table -------------------------------------------------------------------------------------
SPEC = SweepSpec(
    name="t",
    ablation="t",
    base_config="",
    baseline="base",
    seeds=[0, 1, 2],
    paper_baseline=72.5,
    variants=[
        Variant("base", paper=72.5),
        Variant("up", paper=75.0),  # resolved above; the paper above too
        Variant("down", paper=70.0),  # resolved below; the paper below too
        Variant("flipped", paper=60.0),  # resolved above; the paper below
        Variant("straddles", paper=60.0),  # its mean is above but its interval holds 0
        Variant("tie", paper=72.3),  # resolved above; the paper within its one-point tie
        Variant("one seed", paper=60.0),  # two of its trials failed
        Variant("no paper"),
    ],
)
LINEAR_BY_SEED = {
    "base": [80.0, 81.0, 82.0],
    "up": [82.0, 83.5, 84.5],  # differences 2, 2.5, 2.5
    "down": [75.0, 76.2, 76.8],  # -5, -4.8, -5.2
    "flipped": [85.0, 86.5, 87.0],  # 5, 5.5, 5
    "straddles": [79.0, 83.0, 81.5],  # -1, 2, -0.5
    "tie": [81.0, 82.0, 83.0],  # 1, 1, 1
    "one seed": [70.0, 10.0, 10.0],
    "no paper": [80.0, 81.0, 82.0],
}
PARENT_METRICS = {
    "untrained/seed_0/linear_top1": 76.0,
    "untrained/seed_1/linear_top1": 70.0,
    "untrained/seed_2/linear_top1": 77.0,
    "untrained/seed_0/knn_top1": 60.0,
    "untrained/seed_1/knn_top1": 61.0,
    "untrained/seed_2/knn_top1": 62.0,
    "wall_seconds": 100.0,
}
PLANNED = 468.0


def runs_frame(**extra_by_trial) -> pd.DataFrame:
    """The child runs as `child_runs_frame` returns them; `extra_by_trial[(variant, seed)]` adds columns."""
    rows = []
    for variant, scores in LINEAR_BY_SEED.items():
        for seed, lin in enumerate(scores):
            failed = variant == "one seed" and seed > 0
            rows.append(
                {
                    "tags.byol_ray.variant": variant,
                    "tags.byol_ray.seed": str(seed),
                    "status": "FAILED" if failed else "FINISHED",
                    "metrics.eval/byol/linear_top1": lin,
                    "metrics.eval/byol/knn_top1": lin - 10.0,
                    "metrics.trained_steps": PLANNED,
                    "tags.collapsed": "false",
                    **extra_by_trial.get(f"{variant}/{seed}", {}),
                }
            )
    return pd.DataFrame(rows)


def table(**extra_by_trial) -> pd.DataFrame:
    return ablation_table(runs_frame(**extra_by_trial), SPEC, untrained_scores(PARENT_METRICS), PLANNED)


def test_resolved_exactly_where_the_interval_excludes_zero():
    t = table().set_index("variant")
    # up: differences 2, 2.5, 2.5 -> mean 7/3, sd √(((-1/3)² + 2 (1/6)²) / 2) = √(1/12).
    assert t.loc["up", "delta"] == pytest.approx(7 / 3)
    assert t.loc["up", "delta_lo"] == pytest.approx(7 / 3 - T2 * math.sqrt(1 / 12) / math.sqrt(3))  # +1.62 > 0
    # down: -5, -4.8, -5.2 -> mean -5, sd 0.2; hi = -5 + T2 · 0.2 / √3 = -4.50 < 0.
    assert t.loc["down", "delta_hi"] == pytest.approx(-5 + T2 * 0.2 / math.sqrt(3))
    # straddles: -1, 2, -0.5 -> mean 1/6, sd √((49 + 121 + 16) / 36 / 2) = 1.607; interval [-3.83, +4.16].
    assert t.loc["straddles", "delta"] == pytest.approx(1 / 6)
    assert t.loc["straddles", "delta_lo"] == pytest.approx(1 / 6 - T2 * math.sqrt(186 / 72) / math.sqrt(3))
    assert t.loc["straddles", "delta_lo"] < 0 < t.loc["straddles", "delta_hi"]
    assert t.loc["straddles", "delta_p"] == pytest.approx(stats.ttest_1samp([-1, 2, -0.5], 0).pvalue)
    assert dict(t["resolved"]) == {
        "base": "baseline",
        "up": "yes",
        "down": "yes",
        "flipped": "yes",
        "straddles": "no",
        "tie": "yes",  # 1, 1, 1: no variance, p = 0
        "one seed": "n/a",
        "no paper": "no",  # the baseline's own numbers: differences 0, 0, 0
    }
    assert t.loc["one seed", "delta_seeds"] == 1 and t.loc["one seed", "delta"] == pytest.approx(-10.0)
    # Means and counts over FINISHED trials only; a failed trial is counted, not averaged.
    assert (t.loc["one seed", "seeds"], t.loc["one seed", "trials"]) == (1, 3)
    assert (t.loc["base", "linear_mean"], t.loc["base", "linear_std"]) == (pytest.approx(81.0), pytest.approx(1.0))
    # The smallest resolvable difference: pooled sd of the paired differences of the rows with 2+ pairs
    # (up 1/12, down 0.04, flipped 1/12, straddles 186/72, tie 0, no paper 0; 2 dof each), 3 seeds.
    pooled = math.sqrt((1 / 12 + 0.04 + 1 / 12 + 186 / 72) / 6)
    assert t["pooled_delta_sd"].iloc[0] == pytest.approx(pooled)
    assert t["resolvable_delta"].iloc[0] == pytest.approx(T2 * pooled / math.sqrt(3))


def test_a_row_with_a_collapse_is_left_out_of_what_the_sweep_can_resolve():
    # straddles (186/72, the widest spread) collapsed on one seed: the pool is the other five rows.
    t = table(**{"straddles/1": {"tags.collapsed": "true"}}).set_index("variant")
    pooled = math.sqrt((1 / 12 + 0.04 + 1 / 12) / 5)  # 2 dof each
    assert t["pooled_delta_sd"].iloc[0] == pytest.approx(pooled)
    assert t["resolvable_delta"].iloc[0] == pytest.approx(T2 * pooled / math.sqrt(3))
    # The row itself keeps its own interval, and counts its collapse.
    assert t.loc["straddles", "delta_lo"] == pytest.approx(1 / 6 - T2 * math.sqrt(186 / 72) / math.sqrt(3))
    assert t.loc["straddles", "collapsed"] == 1
    # A collapse logged only as the per-epoch metric (a trial cut short before its end tag) counts too.
    t = table(**{"straddles/2": {"metrics.collapsed": 1.0}}).set_index("variant")
    assert t["pooled_delta_sd"].iloc[0] == pytest.approx(pooled)


def test_ordering_is_checked_for_resolved_rows_only():
    t = table().set_index("variant")
    assert dict(t["ordering_holds"]) == {
        "base": "baseline",
        "up": "yes",
        "down": "yes",
        "flipped": "no",
        "straddles": "unresolved",  # our mean is above, the paper's below: not counted against it
        "tie": "no",  # we resolve a difference the paper calls a tie (72.3 vs 72.5)
        "one seed": "n/a (needs 2+ seeds)",
        "no paper": "no paper number",
    }
    assert (t.loc["flipped", "ours_order"], t.loc["flipped", "paper_order"]) == ("above", "below")
    assert (t.loc["straddles", "ours_order"], t.loc["tie", "paper_order"]) == ("unresolved", "tie")
    assert t.loc["down", "paper_delta"] == pytest.approx(-2.5)


def test_gain_over_the_untrained_encoder_is_paired_by_seed():
    t = table().set_index("variant")
    assert list(untrained_scores(PARENT_METRICS).index) == [0, 1, 2]
    # base - untrained of the same seed: 80-76, 81-70, 82-77 = 4, 11, 5 -> mean 20/3, sd² = (64+169+25)/9/2.
    assert t.loc["base", "gain_linear"] == pytest.approx(20 / 3)
    assert t.loc["base", "gain_linear_hi"] == pytest.approx(20 / 3 + T2 * math.sqrt(258 / 18) / math.sqrt(3))
    # kNN: 70-60, 71-61, 72-62 = 10, 10, 10.
    assert (t.loc["base", "gain_knn"], t.loc["base", "gain_knn_lo"]) == (pytest.approx(10.0), pytest.approx(10.0))
    # One finished seed: paired with seed 0's untrained encoder only, no interval.
    assert t.loc["one seed", "gain_linear"] == pytest.approx(70.0 - 76.0)
    assert t.loc["one seed", "gain_linear_seeds"] == 1 and math.isnan(t.loc["one seed", "gain_linear_lo"])
    md = to_markdown(table(), SPEC, untrained_scores(PARENT_METRICS), PLANNED)
    assert "scored once per seed: seed 0: 76.00 / 60.00, seed 1: 70.00 / 61.00, seed 2: 77.00 / 62.00." in md
    assert "| base | 3 | 81.00 ± 1.00 | 71.00 ± 1.00 | +6.67 [-2.74, +16.07] | +0.00 | - | baseline |" in md
    assert "| one seed | 1 | 70.00 | 60.00 | -6.00 | -10.00 | - | n/a | 60.0 | -12.50 |" in md


def test_trials_under_plan_are_flagged_and_named():
    t = table(
        **{
            "down/1": {"metrics.trained_steps": 120.0, "tags.collapsed": "true"},
            "up/2": {"tags.plan_warning": "the warm-up left 12% of the budget to train"},
            "tie/0": {"metrics.trained_steps": math.nan},
        }
    ).set_index("variant")
    assert dict(t["under_plan"]) == {v: int(v in ("down", "up", "tie")) for v in LINEAR_BY_SEED}
    assert t.loc["down", "under_plan_trials"] == "down seed 1 (trained 120 of 468 steps; collapsed)"
    md = to_markdown(t.reset_index(), SPEC, untrained_scores(PARENT_METRICS), PLANNED)
    assert "| yes | 1/3 | 1/3 |" in md  # down: resolved, ordering holds, 1 of 3 under plan, 1 collapsed
    assert (
        "Under plan (trained fewer than their planned steps (the sweep's 468), or plan_warning set; their numbers are "
        "in the row): up seed 2 (plan_warning: the warm-up left 12% of the budget to train); "
        "down seed 1 (trained 120 of 468 steps; collapsed); tie seed 0 (trained steps not logged, 468 planned)."
    ) in md
    assert "Under plan: none; every trial trained their planned steps (the sweep's 468)." in to_markdown(
        table(), SPEC, untrained_scores(PARENT_METRICS), PLANNED
    )


def test_a_trial_is_held_to_its_own_plan_when_the_sweep_holds_images():
    # hold: images gives a bigger batch fewer steps: 234 of the sweep's 468 is that trial's whole plan.
    t = table(
        **{
            "up/0": {"params.plan.total_steps": "234", "metrics.trained_steps": 234.0},
            "up/1": {"params.plan.total_steps": "234", "metrics.trained_steps": 200.0},
        }
    ).set_index("variant")
    assert t.loc["up", "under_plan"] == 1
    assert t.loc["up", "under_plan_trials"] == "up seed 1 (trained 200 of 234 steps)"


def test_an_older_sweep_says_what_it_did_not_score():
    runs = runs_frame().drop(columns=["metrics.trained_steps"])
    t = ablation_table(runs, SPEC)
    assert t["under_plan"].isna().all() and t["gain_linear"].isna().all()
    assert list(t["resolved"])[:3] == ["baseline", "yes", "yes"]  # the paired test needs only the trials
    md = to_markdown(t, SPEC)
    assert "Untrained encoder: not scored in this sweep" in md
    assert "Under plan: not scored (the sweep recorded no step plan)." in md
    assert "| up | 3 | 83.33 ± 1.26 | 73.33 ± 1.26 | not scored | +2.33 [+1.62, +3.05] | 0.005 | yes |" in md
    assert "| 60.0 | -12.50 | above / below | no | - | 0/3 |" in md  # flipped: under plan "-"


def test_csv_keeps_numbers_and_the_untrained_rows(tmp_path):
    u = untrained_scores(PARENT_METRICS)
    csv_frame(table(), u).to_csv(tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv").set_index("variant")
    assert back.loc["up", "delta_lo"] == pytest.approx(7 / 3 - T2 * math.sqrt(1 / 12) / math.sqrt(3))
    assert back.loc["up", "delta_p"] < 0.05 and back.loc["straddles", "resolved"] == "no"
    assert back["resolvable_delta"].dtype == float and back.loc["base", "gain_linear"] == pytest.approx(20 / 3)
    untrained = back[back["kind"] == "untrained"]
    assert list(untrained["seed"]) == [0, 1, 2] and list(untrained["linear_mean"]) == [76.0, 70.0, 77.0]
    assert (back["kind"] == "variant").sum() == len(SPEC.variants)


def test_plot_marks_untrained_seeds_shows_intervals_and_draws_no_empty_paper_panel(tmp_path):
    u = untrained_scores(PARENT_METRICS)
    t = table()
    fig = plot(t, SPEC, tmp_path / "with_paper.png", u)
    assert len(fig.axes) == 3 and (tmp_path / "with_paper.png").stat().st_size > 0
    linear, deltas = fig.axes[0], fig.axes[1]
    # One vertical line per seed's untrained encoder, at its score.
    dotted = sorted(line.get_xdata()[0] for line in linear.get_lines() if line.get_linestyle() == ":")
    assert dotted == [70.0, 76.0, 77.0]
    # Labelled once, left of the leftmost line: three labels a point apart would print over each other.
    assert [(a.get_text(), a.xy[0]) for a in linear.texts] == [("untrained, seeds 0, 1, 2", 70.0)]
    # The Δ panel: one point per row at its mean difference, its error bar the interval's half-width.
    xs = sorted(x for line in deltas.get_lines() if line.get_marker() == "o" for x in line.get_xdata())
    assert xs == pytest.approx(sorted(t["delta"]))
    bars = [c for c in deltas.containers if c.has_xerr]
    widths = sorted(float(seg[1][0] - seg[0][0]) for c in bars for seg in c.lines[2][0].get_segments())
    assert widths == pytest.approx(sorted(2 * (t["delta"] - t["delta_lo"]).fillna(0)))
    no_paper = SweepSpec(name="n", ablation="n", base_config="", baseline="a", variants=[Variant("a"), Variant("b")])
    t2 = ablation_table(runs_frame().replace({"base": "a", "up": "b"}), no_paper)
    assert len(plot(t2, no_paper, tmp_path / "no_paper.png").axes) == 2


# ---- from a real MLflow store --------------------------------------------------------------------------
def test_build_report_reads_the_parent_runs_inputs_from_a_real_store(tmp_path, capsys, fmnist_root):
    from conftest import write_sweep

    from byol_ray.sweep_spec import load_sweep
    from byol_ray.tracking.report import build_report
    from byol_ray.tracking.sweeps import open_parent, trial_run_name, trial_tags
    from byol_ray.tracking.tracker import Tracker

    spec = load_sweep(
        str(
            write_sweep(
                tmp_path, [{"name": "a", "paper": 70.0}, {"name": "b", "paper": 72.0}], 2, fmnist_root=fmnist_root
            )
        )
    )
    base = spec.trial_config("a", 0, [])
    parent, _ = open_parent(spec, base, [], True, tmp_path / "sweep")
    parent.log_params({"sweep.steps": 16})
    parent.log_metrics({"untrained/seed_0/linear_top1": 50.0, "untrained/seed_1/linear_top1": 52.0}, step=0)
    scores = {("a", 0): (60.0, 16), ("a", 1): (61.0, 16), ("b", 0): (63.0, 16), ("b", 1): (64.5, 9)}
    for (variant, seed), (lin, steps) in scores.items():
        cfg = spec.trial_config(variant, seed, [])
        kid = Tracker.start(cfg, trial_tags(spec, variant, seed), parent.run_id, trial_run_name(variant, seed))
        kid.log_metrics({"eval/byol/linear_top1": lin, "eval/byol/knn_top1": lin - 5, "trained_steps": steps}, 4)
        kid.end()
    report = build_report(parent, tmp_path / "report")
    t = report["table"].set_index("variant")
    assert t.loc["b", "delta"] == pytest.approx(3.25)  # differences 3, 3.5
    assert t.loc["b", "delta_lo"] == pytest.approx(3.25 - T1 * math.sqrt(0.125) / math.sqrt(2))
    assert t.loc["a", "gain_linear"] == pytest.approx(9.5)  # 60-50, 61-52
    assert math.isnan(t.loc["a", "gain_knn"])  # the sweep logged no untrained kNN score
    assert t.loc["b", "under_plan_trials"] == "b seed 1 (trained 9 of 16 steps)"
    assert "seed 0: 50.00 / -, seed 1: 52.00 / -." in report["markdown"]
    assert report["markdown"] in capsys.readouterr().out
    logged = {a.path for a in parent.client.list_artifacts(parent.run_id)}
    assert {"sweep.json", "tiny_table.md", "tiny_table.csv", "tiny_table.png"} <= logged
