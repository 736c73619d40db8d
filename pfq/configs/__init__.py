"""The configs shipped with pfq, loadable by name (`python -m pfq.train --config smoke`):

default        the study in miniature on the built-in phantoms: FCMAE-pretrained vs scratch, sized for 2 CPU cores
smoke          the default pipeline at toy size, scratch only, for tests (seconds)
pretrain_smoke pretraining and both inits at toy size (`python -m pfq.pretrain --config pretrain_smoke`)
pirads_binary  the paper's PI-RADS >=4 experiment at the real size (pirads_4class, isup, cspca: its variants)
"""
