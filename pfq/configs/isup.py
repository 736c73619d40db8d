"""The paper's ISUP grade group 0-5 experiment at the real size; everything else as pfq/configs/pirads_binary.py.

    python -m pfq.train --config isup --config.data.manifest=data/manifest.csv \
        --config.sweep.inits='("models/profound","scratch")' --workdir runs/isup
"""

from pfq.config import paper_config


def get_config():
    return paper_config("isup")
