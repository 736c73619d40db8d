"""Report and seed statistics: regeneration from results.csv alone, graceful degradation, paired tests."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from pfq import report, stats
from pfq.results import ResultsError, read_results

CKPT = "/ckpts/profound_conv_tiny"


def synthetic_rows(
    inits=(CKPT, "scratch"), sizes=(16, 64), ratios=(0.0, 0.5, 1.0), seeds=(0, 1, 2), diverged=(), task="pirads_ge4"
) -> list[dict]:
    """Rows shaped like the trainer's: AUC falls with |finetune - test| mismatch, rises with train size,
    and is higher for the pretrained init; `diverged` lists (init, ratio, size, seed) lanes."""
    rng = np.random.default_rng(0)
    rows = []
    for init in inits:
        for size in sizes:
            for f in ratios:
                for seed in seeds:
                    bad = (init, f, size, seed) in diverged
                    for t in ratios:
                        auc = (
                            0.62
                            + 0.05 * math.log2(size / 16)
                            + (0.08 if init != "scratch" else 0.0)
                            - 0.15 * abs(f - t)
                            + rng.normal(0, 0.02)
                        )
                        auc = math.nan if bad else auc
                        rows.append(
                            {
                                "task": task,
                                "init": init,
                                "finetune_hq_ratio": f,
                                "finetune_hq_count": int(f * size + 0.5),
                                "train_size": size,
                                "seed": seed,
                                "test_hq_ratio": t,
                                "n_test": 40,
                                "n_draws": 3,
                                "n_resamples": 200,
                                "auc": auc,
                                "auc_ci_low": auc - 0.1,
                                "auc_ci_high": auc + 0.1,
                                "f1": auc - 0.1,
                                "f1_ci_low": auc - 0.2,
                                "f1_ci_high": auc,
                                "status": "diverged at step 3: non-finite loss" if bad else "ok",
                            }
                        )
    return rows


def write_results(workdir: Path, rows: list[dict]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return workdir


# ----------------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------------
def test_paired_test_hand_computed():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.4641 on 2 df -> p = 0.0742;
    # Wilcoxon exact, all 3 ranks positive: p = 2 * (1/8) = 0.25.
    r = stats.paired_test([0.9, 0.8, 0.7], [0.8, 0.6, 0.4])
    assert r.n == 3
    assert r.mean_diff == pytest.approx(0.2) and r.std_diff == pytest.approx(0.1)
    assert r.mean_a == pytest.approx(0.8) and r.mean_b == pytest.approx(0.6)
    assert r.t_p == pytest.approx(0.07418, abs=1e-4)
    assert r.wilcoxon_p == pytest.approx(0.25)


def test_paired_test_degenerate():
    one = stats.paired_test([0.9], [0.8])  # a single pair: a difference, no test
    assert one.n == 1 and one.mean_diff == pytest.approx(0.1)
    assert math.isnan(one.std_diff) and math.isnan(one.t_p) and math.isnan(one.wilcoxon_p)
    same = stats.paired_test([0.5, 0.6], [0.5, 0.6])  # no difference at all
    assert same.mean_diff == 0 and math.isnan(same.t_p) and math.isnan(same.wilcoxon_p)
    dropped = stats.paired_test([0.9, math.nan, 0.7], [0.8, 0.6, math.nan])  # pairs with a NaN drop out
    assert dropped.n == 1
    assert stats.paired_test([], []).n == 0


def test_summarize_and_format():
    s = stats.summarize([0.5, 0.7, math.nan])
    assert (s.n, s.n_total) == (2, 3)
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(math.sqrt(0.02))
    assert s.format() == "0.600 ± 0.141 (n=2/3)"
    assert stats.summarize([0.25]).format() == "0.250"
    assert stats.summarize([math.nan]).format() == "n/a"


def test_pooled_comparison_pairs_by_seed():
    rows = synthetic_rows(sizes=(16,), seeds=(0, 1, 2, 3))
    (item,) = stats.pooled_comparisons(rows, "auc")
    assert item["init"] == CKPT and item["result"].n == 4
    assert item["result"].mean_diff == pytest.approx(0.08, abs=0.02)
    assert item["result"].t_p < 0.01
    cells = stats.paired_comparisons(rows, "auc")
    assert len(cells) == 9 and all(c["result"].n == 4 for c in cells)
    # Removing scratch leaves nothing to compare against.
    assert stats.pooled_comparisons([r for r in rows if r["init"] != "scratch"], "auc") == []


def test_mismatch_effect_recovers_slope():
    rows = synthetic_rows(inits=("scratch",), sizes=(16,), ratios=(0.0, 0.25, 0.5, 0.75, 1.0))
    (effect,) = stats.mismatch_effect(rows, "auc")
    assert sorted(effect["levels"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert effect["slope"].mean == pytest.approx(-0.15, abs=0.03)
    assert effect["levels"][0.0].mean > effect["levels"][1.0].mean


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
FIGURES = ("heatmap_auc.png", "label_efficiency_auc.png", "mismatch_auc.png")


def test_regenerates_from_results_csv_alone(tmp_path):
    rows = synthetic_rows(diverged={(CKPT, 0.5, 64, 1)})
    workdir = write_results(tmp_path / "run", rows)
    (workdir / "predictions.csv").write_text("lane,case_id\n")
    (workdir / "checkpoints").mkdir()
    summary = report.write_report(workdir)
    first = (workdir / "report.md").read_text()
    for name in FIGURES:
        assert (workdir / name).stat().st_size > 10_000
    assert "profound_conv_tiny − scratch" in summary
    # Delete everything but results.csv, then regenerate through the CLI.
    for path in workdir.iterdir():
        if path.name != "results.csv":
            path.unlink() if path.is_file() else path.rmdir()
    assert report.main([str(workdir)]) == 0
    assert (workdir / "report.md").read_text() == first
    assert all((workdir / name).is_file() for name in FIGURES)
    assert not [p for p in workdir.iterdir() if "tmp" in p.name]  # atomic writes leave no temp files
    # The content: diverged lane listed, its NaNs left out (n=2/3), pooled paired test per train size.
    assert "diverged at step 3" in first
    assert "(n=2/3)" in first
    assert "## Pretrained vs scratch" in first and "| profound_conv_tiny | 16 | 3 |" in first
    assert "Δ=0.5" in first


def test_degrades_with_one_init_one_size_one_seed(tmp_path):
    rows = synthetic_rows(inits=("scratch",), sizes=(32,), seeds=(7,))
    workdir = write_results(tmp_path, rows)
    summary = report.write_report(workdir)
    text = (workdir / "report.md").read_text()
    assert "not in this sweep" in text
    # A single seed: each cell shows the value with its bootstrap CI instead of a std.
    row = next(r for r in rows if r["finetune_hq_ratio"] == 0.0 and r["test_hq_ratio"] == 0.0)
    assert f"{row['auc']:.3f} [{row['auc_ci_low']:.3f}, {row['auc_ci_high']:.3f}]" in text
    assert "scratch" in summary
    assert all((workdir / name).is_file() for name in FIGURES)


def test_all_lanes_diverged_and_other_metric(tmp_path):
    rows = synthetic_rows(
        inits=("scratch",), sizes=(16,), seeds=(0,), diverged={("scratch", f, 16, 0) for f in (0.0, 0.5, 1.0)}
    )
    workdir = write_results(tmp_path, rows)
    report.write_report(workdir, metric="f1")
    text = (workdir / "report.md").read_text()
    assert "n/a" in text and (workdir / "heatmap_f1.png").is_file()


def test_cli_errors(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2  # no results.csv
    write_results(tmp_path, synthetic_rows(sizes=(16,), seeds=(0,)))
    assert report.main([str(tmp_path), "--metric", "nope"]) == 2
    assert "choose from auc, f1" in capsys.readouterr().err


def test_summary_table_accepts_trainer_rows():
    # The trainer passes its rows (numbers, not strings) straight to summary_table.
    text = report.summary_table(synthetic_rows(inits=("scratch",), sizes=(16,)), "auc")
    assert "init=scratch, train size=16" in text and "±" in text


def test_report_shows_either_kappa(tmp_path):
    # Multi-class results carry Cohen's kappa twice; the report can be built on either.
    from pfq.evaluate import metric_names

    rows = synthetic_rows(inits=("scratch",), sizes=(16,), seeds=(0, 1), task="isup")
    for r in rows:
        r["kappa_unweighted"], r["kappa_quadratic"] = r["auc"] - 0.3, r["auc"] - 0.1
    workdir = write_results(tmp_path, rows)
    assert {"kappa_unweighted", "kappa_quadratic"} <= set(metric_names(6)) & set(report.metric_columns(rows))
    for metric in ("kappa_unweighted", "kappa_quadratic"):
        assert report.main([str(workdir), "--metric", metric]) == 0
        assert f"Metric: **{metric}**" in (workdir / "report.md").read_text()


def test_results_csv_reads_back_as_the_trainers_rows(tmp_path):
    rows = synthetic_rows(diverged={(CKPT, 0.5, 64, 1)})
    back = read_results(write_results(tmp_path, rows) / "results.csv")
    assert [list(r) for r in back] == [list(r) for r in rows]
    for mine, theirs in zip(rows, back, strict=True):
        for key, value in mine.items():
            assert type(theirs[key]) is type(value), key
            assert theirs[key] == value or (math.isnan(value) and math.isnan(theirs[key])), key
    assert report.summary_table(back) == report.summary_table(rows)
    assert report.report_markdown(back, "auc", {}) == report.report_markdown(rows, "auc", {})


def test_a_bad_results_cell_is_named(tmp_path, capsys):
    rows = synthetic_rows(sizes=(16,), seeds=(0,))
    rows[1]["seed"] = "one"
    write_results(tmp_path, rows)
    with pytest.raises(ResultsError, match=r"results.csv line 3, column seed: 'one' is not a whole number"):
        read_results(tmp_path / "results.csv")
    assert report.main([str(tmp_path)]) == 2
    assert "line 3, column seed" in capsys.readouterr().err
