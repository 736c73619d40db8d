"""Default: the study in miniature on the built-in phantoms, sized for 2 CPU cores (<10 minutes).

    python -m pfq.train --workdir runs/default

Finetune HQ ratios {0, 0.5, 1} x test HQ ratios {0, 0.5, 1} x 2 seeds, binary PI-RADS >=4, from
scratch, ProFound-Conv atto at 32x64x64. Every field and its meaning: `pfq/config.py`. Override any
field: `--config.optim.steps=400 --config.sweep.seeds='(0,1,2)'`.
"""

from pfq.config import base_config


def get_config():
    return base_config()
