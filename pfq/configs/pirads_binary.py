"""The paper's PI-RADS >=4 vs <4 experiment at the real size, for accelerators.

    python -m pfq.train --config pirads_binary \
        --config.data.manifest=data/manifest.csv \
        --config.sweep.inits='("models/profound","scratch")' --workdir runs/pirads_binary

ProFound-Conv tiny at 64x224x224 (1.0x0.5x0.5 mm), finetune and test HQ ratios {0, .25, .5, .75, 1},
pretrained (a converted checkpoint directory; see tools/convert_weights.py) and scratch, label budgets
{50, 100, 200}, 5 seeds, layer-wise lr decay and drop-path as upstream finetuning. The pool must hold
enough HQ and LQ cases for the largest budget at ratio 0 and at ratio 1 (validation says which
stratum is short). Variants: pirads_4class, isup, cspca.
"""

from pfq.config import paper_config


def get_config():
    return paper_config("pirads_ge4")
