"""The paper's 4-class PI-RADS (2/3/4/5) experiment at the real size; everything else as
pfq/configs/pirads_binary.py. Also reports the binarised >=3 and >=4 AUC/F1, as upstream.

    python -m pfq.train --config pirads_4class --config.data.manifest=data/manifest.csv \
        --config.sweep.inits='("models/profound","scratch")' --workdir runs/pirads_4class
"""

from pfq.config import paper_config


def get_config():
    return paper_config("pirads_4class")
