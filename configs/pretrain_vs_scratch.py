"""The packaged config `pfq/configs/pretrain_vs_scratch.py` (also `--config pretrain_vs_scratch`); kept here so that
`--config configs/pretrain_vs_scratch.py` works from a checkout."""

from pfq.configs.pretrain_vs_scratch import get_config  # noqa: F401
