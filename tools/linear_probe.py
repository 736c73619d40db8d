#!/usr/bin/env python
"""Linear probe: how much of the task a frozen encoder's pooled features carry, next to a random
encoder and a logistic regression on intensity percentiles of the same inputs.

    python tools/linear_probe.py [--config FILE] [--config.x=y ...] --models DIR [DIR ...] [--random-seeds 0 1]
        [--train-sizes 50 400] [--repeats 5]

Features come from the study's data (the config's manifest or phantoms, its split). For each train size and
repeat, a class- and quality-stratified training set is drawn from the finetuning pool (HQ ratio 0.5),
a standardised L2 logistic regression is fitted on it, and the AUC is measured on the whole test pool.
Prints mean ± std AUC over repeats per feature set.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parents[1] / "configs" / "default.py"), "Config file."
)
_MODELS = flags.DEFINE_multi_string("models", [], "pfq model directories (encoders) to probe.")
_RANDOM = flags.DEFINE_multi_integer("random_seeds", [0], "Seeds of randomly initialised encoders to probe.")
_SIZES = flags.DEFINE_multi_integer("train_sizes", [50, 400], "Probe training-set sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Training-set draws per size.")


def percentile_features(volumes: np.ndarray) -> np.ndarray:
    """Per channel: the 5th..95th intensity percentiles of the whole (D, H, W) volume."""
    q = np.percentile(volumes.reshape(len(volumes), -1, volumes.shape[-1]), [5, 25, 50, 75, 95, 99], axis=1)
    return q.transpose(1, 0, 2).reshape(len(volumes), -1)


def encoder_features(spec, variables, volumes: np.ndarray, batch: int = 32) -> np.ndarray:
    import jax

    from pfq.model import features

    fn = jax.jit(lambda v, x: features(spec, v, x))
    return np.concatenate([np.asarray(fn(variables, volumes[i : i + batch])) for i in range(0, len(volumes), batch)])


def probe(feats: np.ndarray, data, sizes, repeats: int) -> dict[int, list[float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pfq.data.stratify import stratified_indices

    pool, test = data.train_pool, data.test_pool
    out = {}
    for size in sizes:
        aucs = []
        for r in range(repeats):
            chosen = pool[stratified_indices(data.is_hq[pool], data.labels[pool], size, 0.5, r, num_classes=2)]
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            clf.fit(feats[chosen], data.labels[chosen])
            aucs.append(roc_auc_score(data.labels[test], clf.predict_proba(feats[test])[:, 1]))
        out[size] = aucs
    return out


def main(argv) -> int:
    del argv
    import jax

    from pfq.convert.store import load_model_dir
    from pfq.data.study import load_study_data
    from pfq.model import init_variables
    from pfq.tasks import get_task
    from pfq.train.trainer import model_spec

    config = _CONFIG.value
    task = get_task(config.task)
    spec = model_spec(config, task.num_classes)
    data = load_study_data(config, task, progress=False)
    volumes = np.stack([data.source[i] for i in range(len(data.labels))])
    sets = {"intensity percentiles": percentile_features(volumes)}
    for seed in _RANDOM.value:
        sets[f"random encoder (seed {seed})"] = encoder_features(
            spec, init_variables(spec, jax.random.key(seed)), volumes
        )
    for model in _MODELS.value:
        _, enc, _ = load_model_dir(model)
        variables = init_variables(spec, jax.random.key(0))
        variables["params"]["encoder"] = enc["params"]["encoder"]
        sets[f"{model}"] = encoder_features(spec, variables, volumes)
    print(
        f"linear probe, task {task.name}: AUC on the test pool ({len(data.test_pool)} cases), "
        f"mean ± std over {_REPEATS.value} training draws at HQ ratio 0.5"
    )
    for name, feats in sets.items():
        result = probe(feats, data, _SIZES.value, _REPEATS.value)
        cells = "  ".join(
            f"n={n}: {np.mean(a):.3f} ± {np.std(a, ddof=1) if len(a) > 1 else 0:.3f}" for n, a in result.items()
        )
        print(f"  {name:<40} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
