"""Pretraining smoke test: FCMAE on a tiny phantom pool with a tiny model, then the smoke sweep with
the pretrained ("fcmae") and scratch inits (seconds each).

    python -m pfq.pretrain --config configs/pretrain_smoke.py --workdir /tmp/pfq-pretrain
    python -m pfq.train --config configs/pretrain_smoke.py --workdir /tmp/pfq-pretrain-sweep
"""

from pfq.config import base_config


def get_config():
    c = base_config()
    c.phantoms.cases = 48
    c.data.test_fraction = 0.5
    c.model.depths = (1, 1, 1, 1)
    c.model.dims = (8, 16, 24, 32)
    c.sweep.inits = ("fcmae", "scratch")
    c.sweep.finetune_hq_ratios = (0.5,)
    c.sweep.train_sizes = (8,)
    c.sweep.test_draws = 2
    c.optim.update({"steps": 6, "batch_size": 2, "warmup_steps": 2})
    c.checkpoint.every_steps = 3
    c.pretrain.update(
        {
            "cases": 12,
            "input_size": (16, 32, 32),
            "steps": 6,
            "batch_size": 2,
            "warmup_steps": 2,
            "decoder_dim": 16,
            "checkpoint_every": 3,
        }
    )
    c.update({"eval_batch_size": 8, "log_every": 2})
    return c
