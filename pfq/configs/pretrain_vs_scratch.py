"""Pretrained vs scratch on the built-in phantoms: FCMAE pretraining on a disjoint, unlabelled phantom
pool (run once and cached), then both initialisations finetuned across the finetune HQ ratios at two
label budgets.

    python -m pfq.train --config configs/pretrain_vs_scratch.py --workdir runs/pretrain_vs_scratch

The "fcmae" init is this config's pretraining (`config.pretrain`, every field in `pfq/config.py`); it is
cached like the phantoms, keyed by every field that changes its weights. A model pretrained elsewhere
(`python -m pfq.pretrain --workdir W`) is used with `--config.sweep.inits='("W/model","scratch")'`.
"""

from pfq.config import base_config


def get_config():
    c = base_config()
    c.sweep.inits = ("fcmae", "scratch")
    c.sweep.train_sizes = (50, 400)
    c.sweep.seeds = (0, 1, 2, 3)
    c.optim.steps = 300
    c.pretrain.update({"steps": 250, "batch_size": 8, "warmup_steps": 15, "init": "trunc002", "grn_stats": "sample"})
    return c
