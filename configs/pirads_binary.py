"""The packaged config `pfq/configs/pirads_binary.py` (also `--config pirads_binary`); kept here so that
`--config configs/pirads_binary.py` works from a checkout."""

from pfq.configs.pirads_binary import get_config  # noqa: F401
