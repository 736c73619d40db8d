"""The packaged config `pfq/configs/pirads_4class.py` (also `--config pirads_4class`); kept here so that
`--config configs/pirads_4class.py` works from a checkout."""

from pfq.configs.pirads_4class import get_config  # noqa: F401
