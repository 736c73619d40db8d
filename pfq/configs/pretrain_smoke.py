"""Pretraining smoke test: FCMAE on a tiny phantom pool with a tiny model, then the smoke sweep with
the pretrained ("fcmae") and scratch inits (seconds each).

    python -m pfq.pretrain --config configs/pretrain_smoke.py --workdir /tmp/pfq-pretrain
    python -m pfq.train --config configs/pretrain_smoke.py --workdir /tmp/pfq-pretrain-sweep
"""

from pfq.configs import smoke


def get_config():
    c = smoke.get_config()
    c.sweep.inits = ("fcmae", "scratch")
    c.sweep.finetune_hq_ratios = (0.5,)
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
    return c
