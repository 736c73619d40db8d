"""The packaged config `pfq/configs/smoke.py` (also `--config smoke`); kept here so that
`--config configs/smoke.py` works from a checkout."""

from pfq.configs.smoke import get_config  # noqa: F401
