"""The packaged config `pfq/configs/cspca.py` (also `--config cspca`); kept here so that
`--config configs/cspca.py` works from a checkout."""

from pfq.configs.cspca import get_config  # noqa: F401
