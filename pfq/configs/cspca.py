"""The paper's csPCa (ISUP >=2) experiment at the real size; everything else as pfq/configs/pirads_binary.py.

    python -m pfq.train --config cspca --config.data.manifest=data/manifest.csv \
        --config.sweep.inits='("models/profound","scratch")' --workdir runs/cspca
"""

from pfq.config import paper_config


def get_config():
    return paper_config("cspca")
