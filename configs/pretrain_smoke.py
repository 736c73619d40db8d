"""The packaged config `pfq/configs/pretrain_smoke.py` (also `--config pretrain_smoke`); kept here so that
`--config configs/pretrain_smoke.py` works from a checkout."""

from pfq.configs.pretrain_smoke import get_config  # noqa: F401
