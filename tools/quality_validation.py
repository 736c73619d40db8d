"""Validation of the image-quality metrics and the HQ/LQ grader on phantoms (numbers in docs/quality.md).

    python tools/quality_validation.py sweep --anatomies 20 --out docs/quality
    python tools/quality_validation.py grader MANIFEST --out docs/quality
    python tools/quality_validation.py single --cases 600 --out docs/quality
    python tools/quality_validation.py study TRUE_WORKDIR IQM_WORKDIR TRUTH_MANIFEST --out docs/quality

`sweep`: each IQM against each artefact's own severity (others at 0.05) on the default phantom grid:
median Spearman rho over anatomies and the median change from severity 0 to 1 in units of the
measure's spread (IQR / 1.35 over the sweep). `grader`: on a labelled phantom set, each IQM's
univariate AUC, the grader's 5-fold cross-validated AUC, the unsupervised rule's agreement, and the
grader fitted on 20 / 50 / 100 labelled cases (10 random draws each, AUC on the remaining cases);
figures of IQM distributions by grade and ROC curves. `single`: a harder set whose LQ cases each have
one artefact at an LQ severity (the others at the HQ level): the grader's CV AUC per artefact. `study`: a study run with
`data.quality_from=iqm` on the set without its quality column against the run with the true grades:
agreement, realised true-HQ ratios per lane and the change in the AUC table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SHAPE, SPACING, LESION_SCALE = (16, 32, 32), (4.0, 2.0, 2.0), 1.6  # the default study's phantoms
LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sweep(anatomies: int, out: Path) -> dict:
    from scipy.stats import spearmanr

    from pfq.data import degrade as dg
    from pfq.data import phantoms as ph
    from pfq.data.iqm import array_iqms, iqm_names

    values = {}
    for art in dg.ARTEFACTS:
        for a in range(anatomies):
            for s in LEVELS:
                sev = {**{x: 0.05 for x in dg.ARTEFACTS}, art: s}
                c = ph.generate_case(
                    5000 + a, quality="hq", shape=SHAPE, spacing=SPACING, severity=sev, lesion_scale=LESION_SCALE
                )
                values[art, a, s] = array_iqms(c.t2w, c.highb, c.adc, c.spacing)
    table = {}
    for name in iqm_names():
        every = np.array([v[name] for v in values.values()], dtype=float)
        q1, q3 = np.nanpercentile(every, [25, 75])
        spread = (q3 - q1) / 1.35 or 1.0
        row = {}
        for art in dg.ARTEFACTS:
            rhos, changes = [], []
            for a in range(anatomies):
                series = [values[art, a, s][name] for s in LEVELS]
                if np.all(np.isfinite(series)) and np.ptp(series) > 0:
                    rhos.append(spearmanr(LEVELS, series).statistic)
                changes.append(series[-1] - series[0])
            row[art] = {
                "rho": float(np.median(rhos)) if rhos else float("nan"),
                "effect": float(np.nanmedian(changes) / spread),
            }
        table[name] = row
    (out / "sweep.json").write_text(json.dumps({"anatomies": anatomies, "levels": LEVELS, "table": table}, indent=1))
    print(f"| IQM | {' | '.join(dg.ARTEFACTS)} |")
    print("|---|" + "---|" * len(dg.ARTEFACTS))
    for name, row in table.items():
        cells = [f"{row[a]['rho']:+.2f} ({row[a]['effect']:+.1f})" for a in dg.ARTEFACTS]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    return table


def _labelled_iqms(manifest_path: Path):
    from pfq.data.cache import default_cache_root
    from pfq.data.grade import feature_matrix
    from pfq.data.iqm import manifest_iqms
    from pfq.data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    rows, problems = manifest_iqms(manifest.cases, default_cache_root(), progress=True)
    if problems:
        raise SystemExit("\n".join(str(p) for p in problems))
    y = np.array([c.quality == "hq" for c in manifest.cases], dtype=np.int64)
    return manifest, rows, feature_matrix(rows), y


def grader(manifest_path: Path, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import cohen_kappa_score, roc_auc_score, roc_curve
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from pfq.data import grade as gr
    from pfq.data.iqm import iqm_names

    manifest, rows, x, y = _labelled_iqms(manifest_path)
    names = iqm_names()
    result = {"n": len(y), "n_hq": int(y.sum())}
    uni = {}
    for j, n in enumerate(names):
        col = np.nan_to_num(x[:, j], nan=np.nanmedian(x[:, j]))
        auc = roc_auc_score(y, col)
        uni[n] = float(max(auc, 1 - auc))  # direction-free: how well the measure alone separates
    result["univariate_auc"] = uni
    splitter = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    oof = cross_val_predict(gr._model(), x, y, cv=splitter, method="predict_proba")[:, 1]
    result["cv_auc"] = float(roc_auc_score(y, oof))
    result["cv_accuracy_at_0.5"] = float(np.mean((oof >= 0.5) == y))
    unsup = gr.grade(rows, [None] * len(y))
    u_hq = np.array([q == "hq" for q in unsup.quality])
    result["unsupervised"] = {
        "auc_of_score": float(roc_auc_score(y, unsup.score)),
        "agreement": float(np.mean(u_hq == y.astype(bool))),
        "kappa": float(cohen_kappa_score(y, u_hq.astype(int))),
        "n_hq": int(u_hq.sum()),
    }
    budgets = {}
    rng = np.random.default_rng(0)
    for k in (20, 50, 100):
        aucs = []
        for _ in range(10):
            while True:
                pick = rng.choice(len(y), size=k, replace=False)
                if 2 <= y[pick].sum() <= k - 2:
                    break
            rest = np.setdiff1d(np.arange(len(y)), pick)
            aucs.append(roc_auc_score(y[rest], gr.fit_predict(x[pick], y[pick], x[rest])))
        budgets[k] = {"mean": float(np.mean(aucs)), "sd": float(np.std(aucs)), "min": float(np.min(aucs))}
    result["labelled_budget_auc"] = budgets
    (out / "grader.json").write_text(json.dumps(result, indent=1))

    shown = sorted(uni, key=uni.get, reverse=True)[:12]
    fig, axes = plt.subplots(3, 4, figsize=(13, 8.5))
    for ax, n in zip(axes.flat, shown, strict=False):
        col = x[:, names.index(n)]
        log = n.endswith(gr.LOG_SUFFIXES)
        for grade_, colour, label in ((1, "tab:blue", "HQ"), (0, "tab:red", "LQ")):
            v = col[(y == grade_) & np.isfinite(col)]
            ax.hist(v, bins=40, alpha=0.55, color=colour, label=label, density=True)
        ax.set_title(f"{'log ' if log else ''}{n}  (AUC {uni[n]:.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"IQM distributions by true grade, default phantom set ({len(y)} cases; the 12 most separating)")
    fig.tight_layout()
    fig.savefig(out / "iqm_distributions.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    fpr, tpr, _ = roc_curve(y, oof)
    ax.plot(fpr, tpr, label=f"logistic, 5-fold CV (AUC {result['cv_auc']:.3f})")
    fpr, tpr, _ = roc_curve(y, unsup.score)
    ax.plot(fpr, tpr, label=f"unsupervised score (AUC {result['unsupervised']['auc_of_score']:.3f})")
    best = max(uni, key=uni.get)
    col = np.nan_to_num(x[:, names.index(best)], nan=np.nanmedian(x[:, names.index(best)]))
    col = col if roc_auc_score(y, col) >= 0.5 else -col
    fpr, tpr, _ = roc_curve(y, col)
    ax.plot(fpr, tpr, "--", label=f"best single IQM, {best} (AUC {uni[best]:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false HQ rate (LQ graded HQ)")
    ax.set_ylabel("true HQ rate")
    ax.set_title("HQ/LQ grader ROC, default phantom set")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "grader_roc.png", dpi=110)
    plt.close(fig)
    print(json.dumps({k: v for k, v in result.items() if k != "univariate_auc"}, indent=1))
    print("univariate AUC:", {k: round(v, 3) for k, v in sorted(uni.items(), key=lambda kv: -kv[1])})
    return result


def single_artefact_set(n: int, out: Path) -> dict:
    """A harder set: HQ cases as in the default set; each LQ case has ONE artefact at an LQ severity."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from pfq.data import degrade as dg
    from pfq.data import grade as gr
    from pfq.data import phantoms as ph
    from pfq.data.iqm import array_iqms

    rng = np.random.default_rng(0)
    rows, y, kind = [], [], []
    for i in range(n):
        base = float(rng.uniform(0.0, 0.15))
        sev = {a: base for a in dg.ARTEFACTS}
        if i % 2:
            art = dg.ARTEFACTS[(i // 2) % len(dg.ARTEFACTS)]
            sev[art] = float(rng.uniform(0.5, 1.0))
        c = ph.generate_case(
            9000 + i,
            quality="lq" if i % 2 else "hq",
            shape=SHAPE,
            spacing=SPACING,
            severity=sev,
            lesion_scale=LESION_SCALE,
        )
        rows.append(array_iqms(c.t2w, c.highb, c.adc, c.spacing))
        y.append(0 if i % 2 else 1)
        kind.append(art if i % 2 else "hq")
    x, y, kind = gr.feature_matrix(rows), np.array(y), np.array(kind)
    splitter = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    oof = cross_val_predict(gr._model(), x, y, cv=splitter, method="predict_proba")[:, 1]
    unsup = gr.grade(rows, [None] * len(y)).score
    result = {
        "n": n,
        "cv_auc": float(roc_auc_score(y, oof)),
        "unsupervised_auc": float(roc_auc_score(y, unsup)),
        "per_artefact": {},
    }
    for art in dg.ARTEFACTS:
        sel = (kind == "hq") | (kind == art)
        result["per_artefact"][art] = {
            "n_lq": int((kind == art).sum()),
            "cv_auc": float(roc_auc_score(y[sel], oof[sel])),
            "unsupervised_auc": float(roc_auc_score(y[sel], unsup[sel])),
        }
    (out / "single_artefact.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 5), sharey=True)
    for ax, score, title in ((axes[0], oof, "logistic, 5-fold CV"), (axes[1], unsup, "unsupervised score")):
        for art in dg.ARTEFACTS:
            sel = (kind == "hq") | (kind == art)
            fpr, tpr, _ = roc_curve(y[sel], score[sel])
            ax.plot(fpr, tpr, label=f"{art} ({roc_auc_score(y[sel], score[sel]):.2f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(f"{title}: HQ vs LQ by one artefact", fontsize=10)
        ax.set_xlabel("false HQ rate (LQ graded HQ)")
        ax.legend(fontsize=8, loc="lower right", title="LQ artefact (AUC)", title_fontsize=8)
    axes[0].set_ylabel("true HQ rate")
    fig.tight_layout()
    fig.savefig(out / "single_artefact_roc.png", dpi=110)
    plt.close(fig)
    print(json.dumps(result, indent=1))
    return result


def _auc_table(workdir: Path) -> dict[tuple[float, float], list[float]]:
    with open(workdir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table: dict[tuple[float, float], list[float]] = {}
    for r in rows:
        table.setdefault((float(r["finetune_hq_ratio"]), float(r["test_hq_ratio"])), []).append(float(r["auc"]))
    return table


def study(true_dir: Path, iqm_dir: Path, truth_manifest: Path, out: Path) -> dict:
    from sklearn.metrics import cohen_kappa_score

    from pfq import evaluate
    from pfq.config import base_config
    from pfq.data.study import load_study_data
    from pfq.tasks import get_task
    from pfq.train import lanes as lanes_lib
    from pfq.train.trainer import lane_training_set

    cfg = base_config()
    cfg.update_from_flattened_dict(_flat(json.loads((iqm_dir / "config.json").read_text())))
    task = get_task(cfg.task)
    data = load_study_data(cfg, task, progress=False)
    with open(truth_manifest, newline="") as f:
        truth = {r["case_id"]: r["quality"] == "hq" for r in csv.DictReader(f)}
    true_hq = np.array([truth[c] for c in data.case_ids])
    result = {
        "grading": data.grading.summary(),
        "agreement": float(np.mean(true_hq == data.is_hq)),
        "kappa": float(cohen_kappa_score(true_hq, data.is_hq)),
    }
    lanes = lanes_lib.make_lanes(cfg.sweep.finetune_hq_ratios, cfg.sweep.inits, cfg.sweep.train_sizes, cfg.sweep.seeds)
    result["lanes"] = [
        {
            "lane": lane.name,
            "requested_hq_ratio": lane.finetune_hq_ratio,
            "true_hq_ratio": float(true_hq[lane_training_set(lane, data, task.num_classes)].mean()),
        }
        for lane in lanes
    ]
    pool_hq, pool_labels = data.is_hq[data.test_pool], data.labels[data.test_pool]
    size = evaluate.max_test_size(pool_hq, pool_labels, cfg.sweep.test_hq_ratios, task.num_classes)
    subsets = evaluate.test_subsets(
        pool_hq,
        pool_labels,
        cfg.sweep.test_hq_ratios,
        size,
        int(cfg.sweep.test_draws),
        int(cfg.sweep.test_seed),
        task.num_classes,
    )
    test_true = {}
    for (ratio, _), idx in subsets.items():
        test_true.setdefault(ratio, []).append(float(true_hq[data.test_pool][idx].mean()))
    result["test_true_hq_ratio"] = {str(r): float(np.mean(v)) for r, v in test_true.items()}
    a, b = _auc_table(true_dir), _auc_table(iqm_dir)
    result["auc"] = {
        f"{k[0]:g}/{k[1]:g}": {
            "true": float(np.mean(a[k])),
            "iqm": float(np.mean(b[k])),
            "true_sd": float(np.std(a[k])),
            "iqm_sd": float(np.std(b[k])),
        }
        for k in sorted(a)
    }
    result["mean_abs_delta_auc"] = float(np.mean([abs(np.mean(b[k]) - np.mean(a[k])) for k in a]))
    (out / "study.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep")
    s.add_argument("--anatomies", type=int, default=20)
    g = sub.add_parser("grader")
    g.add_argument("manifest", type=Path)
    sa = sub.add_parser("single")
    sa.add_argument("--cases", type=int, default=600)
    st = sub.add_parser("study")
    st.add_argument("true_workdir", type=Path)
    st.add_argument("iqm_workdir", type=Path)
    st.add_argument("truth_manifest", type=Path)
    for p in (s, g, sa, st):
        p.add_argument("--out", type=Path, default=Path("docs/quality"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "sweep":
        sweep(args.anatomies, args.out)
    elif args.command == "grader":
        grader(args.manifest, args.out)
    elif args.command == "single":
        single_artefact_set(args.cases, args.out)
    else:
        study(args.true_workdir, args.iqm_workdir, args.truth_manifest, args.out)


if __name__ == "__main__":
    main()
