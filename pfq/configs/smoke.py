"""Smoke: the default pipeline at toy size, for tests (seconds).

python -m pfq.train --config smoke --workdir /tmp/pfq-smoke
"""

from pfq.config import base_config


def get_config():
    c = base_config()
    c.phantoms.cases = 48
    c.data.test_fraction = 0.5
    c.model.depths = (1, 1, 1, 1)
    c.model.dims = (8, 16, 24, 32)
    c.sweep.train_sizes = (8,)
    c.sweep.test_draws = 2
    c.optim.update({"steps": 6, "batch_size": 2, "warmup_steps": 2})
    c.checkpoint.every_steps = 3
    c.update({"eval_batch_size": 8, "log_every": 2})
    return c
