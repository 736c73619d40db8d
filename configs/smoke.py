"""Smoke: the default pipeline at toy size, for tests (seconds).

    python -m pfq.train --config configs/smoke.py --workdir /tmp/pfq-smoke
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
    c.optim.steps = 6
    c.optim.batch_size = 2
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.eval_batch_size = 8
    c.log_every = 2
    return c
