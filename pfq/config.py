"""Run configuration: every field with its default, plus loading a config file with overrides.

Config files under `configs/` are Python files with `get_config()` returning an
`ml_collections.ConfigDict` (usually `base_config()` with changes); any field can be overridden on the
command line with `--config.section.field=value`.
"""

from __future__ import annotations

from ml_collections import ConfigDict, config_dict


def base_config() -> ConfigDict:
    """Every field a run reads, with the small-CPU defaults; configs/*.py start from this."""
    c = ConfigDict()
    c.task = "pirads_ge4"

    c.data = ConfigDict()
    c.data.manifest = ""  # empty: generate (or reuse) the built-in phantom set below
    c.data.quality_scale = "piqual_v1"  # how numeric `quality` scores read: piqual_v1 (1-5) or piqual_v2 (1-3)
    c.data.quality_threshold = config_dict.placeholder(float)  # scores >= this are HQ; None: scale's (v1 4, v2 3)
    c.data.input_size = (16, 32, 32)  # (D, H, W) after crop / pad; 16 is the minimum (total stride)
    # Resample to this voxel spacing, (D, H, W) mm; () keeps T2w's grid (upstream never resamples).
    # The real-size configs use (1.0, 0.5, 0.5) with input_size (64, 224, 224).
    c.data.spacing = ()
    c.data.cache_dir = ""  # preprocessed-volume cache; empty: $PFQ_CACHE/volumes or ~/.cache/pfq/volumes
    c.data.prepare_workers = 0  # processes that fill the cache on first use (0: the main process)
    c.data.test_fraction = 0.4  # of each (label, quality) stratum; ignored if the manifest has `split`
    c.data.split_seed = 0
    c.data.augment = True
    # Rotation and zoom keep a small model from memorising a few hundred cases (measured on phantoms).
    c.data.augment_rotate_deg = 10.0  # in-plane rotation U(-a, a) degrees when augmenting; 0: off
    c.data.augment_zoom = 0.1  # in-plane zoom 1 + U(-a, a) when augmenting; 0: off
    c.data.balance = False  # inverse-frequency class sampling, as upstream's option
    c.data.exact_batch_quality = False  # every batch holds HQ cases in the lane set's share, to the case
    c.data.workers = 0  # Grain worker processes (0: threads in the main process)

    c.phantoms = ConfigDict()
    c.phantoms.dir = ""  # empty: a cache folder keyed by the parameters ($PFQ_CACHE or ~/.cache/pfq)
    # A coarse grid (4 x 2 x 2 mm) keeps the CPU default within minutes; lesions are scaled up so that
    # they still span a few voxels (lesion_scale 1 gives the PI-CAI-like sizes).
    c.phantoms.cases = 1600
    c.phantoms.seed = 0
    c.phantoms.shape = (16, 32, 32)
    c.phantoms.spacing = (4.0, 2.0, 2.0)  # mm along (D, H, W)
    c.phantoms.hq_fraction = 0.5
    c.phantoms.lesion_scale = 1.6

    c.model = ConfigDict()
    c.model.size = "atto"
    # Set both depths and dims to override the preset. The CPU default is a ProFound-Conv a quarter
    # of atto's depth and 40% of its width, so six lanes train in minutes on 2 cores.
    c.model.depths = (1, 1, 2, 1)
    c.model.dims = (16, 32, 64, 128)
    c.model.drop_path = 0.1
    c.model.depthwise = "auto"
    c.model.dtype = "float32"
    c.model.remat_stages = (False, False, False, False)

    c.sweep = ConfigDict()
    c.sweep.finetune_hq_ratios = (0.0, 0.5, 1.0)
    c.sweep.test_hq_ratios = (0.0, 0.5, 1.0)
    c.sweep.inits = ("scratch",)  # or converted checkpoint directories
    c.sweep.train_sizes = (400,)
    c.sweep.seeds = (0, 1)
    c.sweep.test_size = 0  # 0: the largest size every test ratio can be drawn at
    c.sweep.test_draws = 5
    c.sweep.test_seed = 0
    c.sweep.bootstrap_resamples = 1000  # for the percentile 95% CIs in results.csv; 0: none

    c.optim = ConfigDict()
    c.optim.steps = 700
    c.optim.batch_size = 8
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 30
    c.optim.final_lr_fraction = 0.0
    c.optim.grad_clip = 1.0
    c.optim.layer_decay = 1.0
    c.optim.mode = "full"  # or "linear_probe"
    c.optim.loss = "ce"  # or "bce" for binary tasks

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2

    # Self-supervised FCMAE pretraining (`python -m pfq.pretrain`; the init "fcmae" in sweep.inits runs or
    # reuses a cached one). Upstream's choices unless noted.
    c.pretrain = ConfigDict()
    c.pretrain.manifest = ""  # unlabelled cases; empty: a phantom pool generated with phantom_seed
    c.pretrain.quality = "all"  # pretrain on all cases, or only "hq" / "lq" (a manifest needs `quality`)
    c.pretrain.cases = 800  # phantom pool size
    c.pretrain.phantom_seed = 1000  # differs from phantoms.seed: disjoint from finetuning and test phantoms
    c.pretrain.hq_fraction = 0.5  # HQ share of the phantom pool: pretraining-data quality as a study axis
    c.pretrain.input_size = (16, 64, 64)  # (D, H, W), multiples of the patch (16); phantoms at phantoms.spacing
    c.pretrain.seeds = (0,)  # one lane per seed; the first seed's encoder is WORKDIR/model
    c.pretrain.steps = 600
    c.pretrain.batch_size = 16
    c.pretrain.lr = 1.5e-3  # upstream: 1e-3 (not scaled by batch size)
    c.pretrain.b2 = 0.95
    c.pretrain.weight_decay = 0.05  # on kernels, GRN parameters and the mask token, as upstream
    c.pretrain.warmup_steps = 30  # then cosine to 0
    c.pretrain.grad_clip = 0.0  # upstream does not clip
    c.pretrain.mask_ratio = 0.6
    c.pretrain.decoder_dim = 96  # upstream 512 for a 768-wide encoder
    c.pretrain.decoder_depth = 1
    c.pretrain.norm_pix_loss = True
    c.pretrain.grn_stats = "batch"  # "batch": upstream's sparse GRN; "sample": per sample, like finetuning
    c.pretrain.init = "upstream"  # "upstream" (FCMAE's std-1 re-initialisation) or "trunc002" (pfq's)
    c.pretrain.augment = True  # flips, intensity, noise, and data.augment_rotate_deg / augment_zoom
    c.pretrain.checkpoint_every = 100
    c.pretrain.dir = ""  # for the "fcmae" init: empty is a cache folder keyed by the fields above

    c.export_models = False  # keep each finished lane's model in workdir/models/<lane> (converter format)
    c.eval_batch_size = 16
    c.log_every = 10
    return c


def paper_config(task: str) -> ConfigDict:
    """The paper's experiments at the real size (configs/pirads_binary.py and its variants)."""
    c = base_config()
    c.task = task
    c.data.input_size = (64, 224, 224)
    c.data.spacing = (1.0, 0.5, 0.5)
    c.data.test_fraction = 0.3
    c.data.workers = 4
    c.model.size = "tiny"
    c.model.depths, c.model.dims = (), ()
    c.model.drop_path = 0.1
    c.model.remat_stages = ("light", "light", "none", "none")  # stages 0-1 activations dominate memory
    ratios = (0.0, 0.25, 0.5, 0.75, 1.0)
    c.sweep.finetune_hq_ratios = ratios
    c.sweep.test_hq_ratios = ratios
    c.sweep.inits = ("scratch",)  # add converted checkpoint directories on the command line
    c.sweep.train_sizes = (50, 100, 200)
    c.sweep.seeds = (0, 1, 2, 3, 4)
    c.optim.update({"steps": 3000, "batch_size": 4, "lr": 5e-4, "warmup_steps": 300, "layer_decay": 0.8})
    c.checkpoint.every_steps = 250
    c.update({"eval_batch_size": 8, "log_every": 50})
    return c


def validate_config(c: ConfigDict) -> None:
    """Reject configs that cannot run, naming the field."""
    from pfq.tasks import get_task

    get_task(c.task)
    for name in ("finetune_hq_ratios", "test_hq_ratios"):
        for r in c.sweep[name]:
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"config.sweep.{name}: ratio {r} is outside [0, 1]")
    for name in ("train_sizes", "seeds", "finetune_hq_ratios", "test_hq_ratios", "inits"):
        if len(c.sweep[name]) == 0:
            raise ValueError(f"config.sweep.{name} is empty")
    if any(int(n) <= 0 for n in c.sweep.train_sizes):
        raise ValueError(f"config.sweep.train_sizes must be positive, got {tuple(c.sweep.train_sizes)}")
    if int(c.optim.steps) <= 0 or int(c.optim.batch_size) <= 0:
        raise ValueError("config.optim.steps and config.optim.batch_size must be positive")
    if "fcmae" in tuple(c.sweep.inits):  # the init that pretrains with this config first
        from pfq.pretrain.pretrainer import validate_pretrain_config

        validate_pretrain_config(c)
    if len(c.data.input_size) != 3:
        raise ValueError(f"config.data.input_size must be (D, H, W), got {tuple(c.data.input_size)}")
    from pfq.data.manifest import quality_rule
    from pfq.data.preprocess import PreprocessConfig

    try:
        quality_rule(c.data.quality_scale, c.data.quality_threshold)
        PreprocessConfig.from_config(c.data)
    except ValueError as e:
        raise ValueError(f"config.data: {e}") from None
