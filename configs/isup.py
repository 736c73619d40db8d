"""The packaged config `pfq/configs/isup.py` (also `--config isup`); kept here so that
`--config configs/isup.py` works from a checkout."""

from pfq.configs.isup import get_config  # noqa: F401
