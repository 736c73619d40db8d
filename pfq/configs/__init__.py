"""The configs shipped with pfq, loadable by name (`python -m pfq.train --config smoke`):

default        the study in miniature on the built-in phantoms, sized for 2 CPU cores
smoke          the default pipeline at toy size, for tests (seconds)
pretrain_vs_scratch  FCMAE pretraining on a disjoint phantom pool, then pretrained and scratch inits finetuned
pretrain_smoke the same at toy size (`python -m pfq.pretrain --config pretrain_smoke` pretrains only)
pirads_binary  the paper's PI-RADS >=4 experiment at the real size (pirads_4class, isup, cspca: its variants)
"""
