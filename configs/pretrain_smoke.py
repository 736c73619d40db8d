"""Pretraining smoke test: FCMAE on a tiny phantom pool with a tiny model (seconds).

    python -m pfq.pretrain --config configs/pretrain_smoke.py --workdir /tmp/pfq-pretrain
"""

from pfq.config import base_config


def get_config():
    c = base_config()
    c.model.depths = (1, 1, 1, 1)
    c.model.dims = (8, 16, 24, 32)
    c.pretrain.update({"cases": 12, "input_size": (16, 32, 32), "steps": 6, "batch_size": 2, "warmup_steps": 2,
                       "decoder_dim": 16, "checkpoint_every": 3})
    c.log_every = 2
    return c
