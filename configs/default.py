"""The packaged config `pfq/configs/default.py` (also `--config default`); kept here so that
`--config configs/default.py` works from a checkout."""

from pfq.configs.default import get_config  # noqa: F401
