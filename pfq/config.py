"""Run configuration: every field with its default, its type and domain, and loading a config with
overrides.

A config is a Python file with `get_config()` returning an `ml_collections.ConfigDict` (usually
`base_config()` with changes). The package ships its configs in `pfq/configs/` (`default`, `smoke` and
the paper's experiments), loadable by name; any other file is loaded by path. Any field can be
overridden on the command line with `--config.section.field=value`. After the overrides the config
is locked (no new fields) and validated against `FIELDS`: an unknown field, a value of the wrong
type or outside its domain is a `ConfigError` naming the field.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict, config_dict

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def base_config() -> ConfigDict:
    """Every field a run reads, with the small-CPU defaults (the only place defaults live; configs start
    from this). `FIELDS` below gives each field its type and domain."""
    c = ConfigDict()
    c.task = "pirads_ge4"

    c.data = ConfigDict()
    c.data.manifest = ""  # empty: generate (or reuse) the built-in phantom set below
    c.data.quality_scale = "piqual_v1"  # how numeric `quality` scores read: piqual_v1 (1-5) or piqual_v2 (1-3)
    c.data.quality_threshold = config_dict.placeholder(float)  # scores >= this are HQ; None: scale's (v1 4, v2 3)
    # "label": the manifest's quality column; "iqm": graded from image-quality metrics where it is
    # blank or absent (labels win where present; see pfq/data/grade.py and docs/quality.md).
    c.data.quality_from = "label"
    c.data.input_size = (16, 32, 32)  # (D, H, W) after crop / pad; 16 is the minimum (total stride)
    # Resample to this voxel spacing, (D, H, W) mm; () keeps T2w's grid (upstream never resamples).
    # The real-size configs use (1.0, 0.5, 0.5) with input_size (64, 224, 224).
    c.data.spacing = ()
    c.data.cache_dir = ""  # preprocessed-volume cache; empty: $PFQ_CACHE/volumes or ~/.cache/pfq/volumes
    c.data.prepare_workers = 0  # processes that fill the cache on first use (0: the main process)
    c.data.test_fraction = 0.4  # of each (label, quality) stratum; ignored if the manifest has `split`
    c.data.split_seed = 0
    c.data.augment = True
    # "pfq": flip, per-channel gain/offset, noise, and the rotation and zoom below; "upstream": upstream
    # ProFound's finetuning transforms and probabilities (pfq/data/augment_upstream.py; the real-size
    # configs use it, and it ignores the two fields below).
    c.data.augment_preset = "pfq"
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
    # Lanes trained together by one compiled step (per init); 0: all of them. Smaller groups need
    # less device memory and train one after another (`python -m pfq.plan` sizes this).
    c.sweep.lanes_per_group = 0
    c.sweep.test_size = 0  # 0: the largest size every test ratio can be drawn at
    c.sweep.test_draws = 5
    c.sweep.test_seed = 0
    c.sweep.bootstrap_resamples = 1000  # for the percentile 95% CIs in results.csv; 0: none
    # Also fit a logistic regression on per-channel intensity percentiles to each (finetune ratio, train
    # size, seed)'s finetuning set: results rows with init "percentile-lr", a reference a CNN should beat.
    c.sweep.baseline = True

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
    """The paper's experiments at the real size (the `pirads_binary` config and its variants)."""
    c = base_config()
    c.task = task
    c.data.input_size = (64, 224, 224)
    c.data.spacing = (1.0, 0.5, 0.5)
    c.data.test_fraction = 0.3
    c.data.workers = 4
    c.data.augment_preset = "upstream"
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
    # 75 lanes per init do not fit any TPU slice at once; groups of 8 put one lane (batch 4) on each
    # chip of an 8-chip slice (v5e:2x4, v6e:2x4). Check a slice with `python -m pfq.plan`.
    c.sweep.lanes_per_group = 8
    c.optim.update({"steps": 3000, "batch_size": 4, "lr": 5e-4, "warmup_steps": 300, "layer_decay": 0.8})
    c.checkpoint.every_steps = 250
    c.update({"eval_batch_size": 8, "log_every": 50})
    return c


# ----------------------------------------------------------------------------------------------
# Types and domains: one rule per field, checked after the overrides.
# ----------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config that cannot run: an unknown field, or a value of the wrong type or outside its domain."""


MIN_INPUT_SIZE = 16  # the model's total stride (stem 4 x two 2x downsamples): smaller inputs pool nothing
SEED_LIMIT = 2**32  # seeds become uint32 PRNG keys
REMAT_MODES = ("none", "light", "full")


@dataclass(frozen=True)
class Rule:
    """kind: str, int, float, bool, or a tuple of one of them ("ints", "floats", "strs", "remat");
    `ok` tests a value (each element of a tuple) and `want` says the domain in words; `choices`
    (loaded when checked) lists the allowed values; `sizes`: allowed tuple lengths (None: 1 or more)."""

    kind: str
    ok: Callable[[Any], bool] | None = None
    want: str = ""
    choices: Callable[[], Collection] | None = None
    sizes: tuple[int, ...] | None = None
    optional: bool = False  # None allowed


def _at_least(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= lo), f">= {lo}"


def _between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> tuple[Callable, str]:
    ok = lambda v: (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    return ok, f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"


def _rule(kind: str, bounds: tuple[Callable, str] | None = None, **kwargs) -> Rule:
    ok, want = bounds or (None, "")
    return Rule(kind, ok, want, **kwargs)


def _tasks():
    from pfq.tasks import TASKS

    return TASKS


def _quality_scales():
    from pfq.data.manifest import QUALITY_SCALES

    return QUALITY_SCALES


def _model_sizes():
    from pfq.model.convnext import SIZES

    return SIZES


def _depthwise_impls():
    from pfq.model.depthwise import IMPLEMENTATIONS

    return ["auto", *IMPLEMENTATIONS]


_SEED = _between(0, SEED_LIMIT, open_hi=True)
_RATIO = _between(0, 1)
_POSITIVE = _at_least(1)
_NON_NEGATIVE = _at_least(0)

FIELDS: dict[str, Rule] = {
    "task": _rule("str", choices=_tasks),
    "data.manifest": _rule("str"),
    "data.quality_scale": _rule("str", choices=_quality_scales),
    "data.quality_threshold": _rule("float", optional=True),  # its range depends on the scale: checked below
    "data.quality_from": _rule("str", choices=lambda: ("label", "iqm")),
    "data.input_size": _rule(
        "ints", (lambda v: v >= MIN_INPUT_SIZE, f">= {MIN_INPUT_SIZE} (the model's total stride)"), sizes=(3,)
    ),
    "data.spacing": _rule("floats", sizes=(0, 3)),  # () keeps T2w's grid; the range: PreprocessConfig
    "data.cache_dir": _rule("str"),
    "data.prepare_workers": _rule("int", _NON_NEGATIVE),
    "data.test_fraction": _rule("float", _between(0, 1, open_lo=True, open_hi=True)),
    "data.split_seed": _rule("int", _SEED),
    "data.augment": _rule("bool"),
    "data.augment_preset": _rule("str", choices=lambda: ("pfq", "upstream")),
    "data.augment_rotate_deg": _rule("float", _between(0, 180)),
    "data.augment_zoom": _rule("float", _between(0, 1, open_hi=True)),
    "data.balance": _rule("bool"),
    "data.exact_batch_quality": _rule("bool"),
    "data.workers": _rule("int", _NON_NEGATIVE),
    "phantoms.dir": _rule("str"),
    "phantoms.cases": _rule("int", _POSITIVE),
    "phantoms.seed": _rule("int", _SEED),
    "phantoms.shape": _rule("ints", _POSITIVE, sizes=(3,)),
    "phantoms.spacing": _rule("floats", (lambda v: v > 0, "> 0 (mm)"), sizes=(3,)),
    "phantoms.hq_fraction": _rule("float", _RATIO),
    "phantoms.lesion_scale": _rule("float", _between(0, 10, open_lo=True)),
    "model.size": _rule("str", choices=_model_sizes),
    "model.depths": _rule("ints", _POSITIVE, sizes=(0, 4)),  # () with dims (): the `size` preset
    "model.dims": _rule("ints", _POSITIVE, sizes=(0, 4)),
    "model.drop_path": _rule("float", _between(0, 1, open_hi=True)),
    "model.depthwise": _rule("str", choices=_depthwise_impls),
    "model.dtype": _rule("str", choices=lambda: ("float32", "bfloat16")),
    "model.remat_stages": _rule("remat", sizes=(4,)),
    "sweep.finetune_hq_ratios": _rule("floats", _RATIO),
    "sweep.test_hq_ratios": _rule("floats", _RATIO),
    "sweep.inits": _rule("strs", (bool, "'scratch' or a converted checkpoint directory")),
    "sweep.train_sizes": _rule("ints", _POSITIVE),
    "sweep.seeds": _rule("ints", _SEED),
    "sweep.lanes_per_group": _rule("int", _NON_NEGATIVE),  # 0: all lanes in one group
    "sweep.test_size": _rule("int", _NON_NEGATIVE),  # 0: the largest size every test ratio can be drawn at
    "sweep.test_draws": _rule("int", _POSITIVE),
    "sweep.test_seed": _rule("int", _SEED),
    "sweep.bootstrap_resamples": _rule("int", _NON_NEGATIVE),
    "sweep.baseline": _rule("bool"),
    "optim.steps": _rule("int", _POSITIVE),
    "optim.batch_size": _rule("int", _POSITIVE),
    "optim.lr": _rule("float", _between(0, 10, open_lo=True)),
    "optim.weight_decay": _rule("float", _NON_NEGATIVE),
    "optim.warmup_steps": _rule("int", _NON_NEGATIVE),
    "optim.final_lr_fraction": _rule("float", _RATIO),
    "optim.grad_clip": _rule("float", _NON_NEGATIVE),  # 0: no clipping
    "optim.layer_decay": _rule("float", _between(0, 1, open_lo=True)),
    "optim.mode": _rule("str", choices=lambda: ("full", "linear_probe")),
    "optim.loss": _rule("str", choices=lambda: ("ce", "bce")),
    "checkpoint.every_steps": _rule("int", _POSITIVE),
    "checkpoint.keep": _rule("int", _POSITIVE),
    "pretrain.manifest": _rule("str"),
    "pretrain.quality": _rule("str", choices=lambda: ("all", "hq", "lq")),
    "pretrain.cases": _rule("int", _POSITIVE),
    "pretrain.phantom_seed": _rule("int", _SEED),
    "pretrain.hq_fraction": _rule("float", _RATIO),
    "pretrain.input_size": _rule(
        "ints", (lambda v: v >= 16 and v % 16 == 0, "a multiple of the patch size 16"), sizes=(3,)
    ),
    "pretrain.seeds": _rule("ints", _SEED),
    "pretrain.steps": _rule("int", _POSITIVE),
    "pretrain.batch_size": _rule("int", _POSITIVE),
    "pretrain.lr": _rule("float", _between(0, 10, open_lo=True)),
    "pretrain.b2": _rule("float", _between(0, 1, open_hi=True)),
    "pretrain.weight_decay": _rule("float", _NON_NEGATIVE),
    "pretrain.warmup_steps": _rule("int", _NON_NEGATIVE),
    "pretrain.grad_clip": _rule("float", _NON_NEGATIVE),
    "pretrain.mask_ratio": _rule("float", _between(0, 1, open_hi=True)),
    "pretrain.decoder_dim": _rule("int", _POSITIVE),
    "pretrain.decoder_depth": _rule("int", _NON_NEGATIVE),
    "pretrain.norm_pix_loss": _rule("bool"),
    "pretrain.grn_stats": _rule("str", choices=lambda: ("batch", "sample")),
    "pretrain.init": _rule("str", choices=lambda: ("upstream", "trunc002")),
    "pretrain.augment": _rule("bool"),
    "pretrain.checkpoint_every": _rule("int", _POSITIVE),
    "pretrain.dir": _rule("str"),
    "export_models": _rule("bool"),
    "eval_batch_size": _rule("int", _POSITIVE),
    "log_every": _rule("int", _POSITIVE),
}

_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a finite number",
    "bool": "True or False",
    "ints": "a tuple of integers",
    "floats": "a tuple of finite numbers",
    "strs": "a tuple of strings",
    "remat": "a tuple of booleans or modes " + "/".join(REMAT_MODES),
}


def _scalar_ok(kind: str, value: Any) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "remat":
        return isinstance(value, bool) or value in REMAT_MODES
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float) and math.isfinite(value)
    raise AssertionError(kind)


def check_field(name: str, value: Any) -> None:
    """Raise `ConfigError` unless `value` has the type and domain of field `name`."""
    rule = FIELDS[name]
    if rule.optional and value is None:
        return
    element = {"ints": "int", "floats": "float", "strs": "str", "remat": "remat"}.get(rule.kind)
    sizes = "" if rule.sizes is None else " of length " + " or ".join(map(str, rule.sizes))
    expected = f"{_KIND_WORDS[rule.kind]}{sizes}"
    values = value if element else (value,)
    if element:
        if not isinstance(value, tuple | list) or not (len(value) in rule.sizes if rule.sizes else len(value) > 0):
            raise ConfigError(f"config.{name} = {value!r}: expected {expected}")
    if not all(_scalar_ok(element or rule.kind, v) for v in values):
        raise ConfigError(f"config.{name} = {value!r}: expected {expected}")
    if rule.ok is not None and not all(rule.ok(v) for v in values):
        each = "each value" if element else "a value"
        raise ConfigError(f"config.{name} = {value!r}: expected {each} {rule.want}")
    if rule.choices is not None:
        allowed = rule.choices()
        if not all(v in allowed for v in values):
            raise ConfigError(f"config.{name} = {value!r}: expected one of {sorted(allowed)}")


def _flatten(c: ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key in c.keys():
        value = c[key]
        if isinstance(value, ConfigDict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unknown_field(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean config.{close[0]}?" if close else " (every field: pfq/config.py)"
    return ConfigError(f"config.{name} is not a config field{hint}")


def validate_config(c: ConfigDict) -> None:
    """Reject configs that cannot run, naming the field: every field's type and domain (`FIELDS`),
    then the rules that tie fields together."""
    fields = _flatten(c)
    for name in fields:
        if name not in FIELDS:
            raise unknown_field(name)
    for name in FIELDS:
        if name not in fields:
            raise ConfigError(f"config.{name} is missing (start configs from pfq.config.base_config())")
        check_field(name, fields[name])
    if bool(c.model.depths) != bool(c.model.dims):
        raise ConfigError(
            "config.model.depths and config.model.dims: set both (a custom model) or neither "
            f"(the config.model.size preset), got {tuple(c.model.depths)} and {tuple(c.model.dims)}"
        )
    if c.optim.loss == "bce" and _tasks()[c.task].num_classes != 2:
        raise ConfigError(
            f"config.optim.loss = 'bce' needs a two-class task; {c.task} has {_tasks()[c.task].num_classes} classes"
        )
    from pfq.data.manifest import quality_rule
    from pfq.data.preprocess import PreprocessConfig

    try:
        quality_rule(c.data.quality_scale, c.data.quality_threshold)
    except ValueError as e:
        raise ConfigError(f"config.data.quality_threshold: {e}") from None
    try:
        PreprocessConfig.from_config(c.data)
    except ValueError as e:
        raise ConfigError(f"config.data.spacing / input_size: {e}") from None


# ----------------------------------------------------------------------------------------------
# Loading: a packaged config by name or a file by path, command-line overrides, lock, validate.
# ----------------------------------------------------------------------------------------------
def packaged_configs() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.py") if not p.stem.startswith("_"))


def config_path(source: str | Path) -> Path:
    """A config file: an existing path, else the packaged config of that name (`smoke`, `default`)."""
    path = Path(source)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{source}.py"
    if path.suffix != ".py" and packaged.is_file():
        return packaged
    raise ConfigError(f"config {source}: no such file, and not a packaged config ({', '.join(packaged_configs())})")


def parse_override(name: str, text: str) -> Any:
    """A command-line value for field `name`: strings as written, everything else as a Python literal."""
    if name not in FIELDS:
        raise unknown_field(name)
    kind, optional = FIELDS[name].kind, FIELDS[name].optional
    if kind == "str":
        return text
    if kind == "bool" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if kind == "strs":  # a single unquoted directory
            return (text,)
        raise ConfigError(f"config.{name}={text}: expected {_KIND_WORDS[kind]} written as a Python literal") from None
    if isinstance(value, list):
        value = tuple(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind == "floats" and isinstance(value, tuple):
        value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
    if value is None and not optional:
        raise ConfigError(f"config.{name}=None: expected {_KIND_WORDS[kind]}")
    return value


def apply_overrides(c: ConfigDict, overrides: Sequence[tuple[str, str]]) -> ConfigDict:
    """`(field, text)` pairs, as `--config.field=text` on the command line; each checked on its own."""
    for name, text in overrides:
        value = parse_override(name, text)
        check_field(name, value)
        *sections, leaf = name.split(".")
        target = c
        for section in sections:
            target = target[section]
        try:
            target[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{name}={text}: {e}") from None
    return c


def load_config(source: str | Path | None = None, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    """The config file `source` (a path or a packaged name; None: `default`) with `overrides`
    applied, locked and validated; `ConfigError` names what is wrong."""
    path = config_path("default" if source is None else source)
    spec = importlib.util.spec_from_file_location(f"pfq_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config {path}: cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        c = module.get_config()
    except Exception as e:  # the user's file: report it in one line, as any other bad input
        raise ConfigError(f"config {path}: {type(e).__name__}: {e}") from None
    if not isinstance(c, ConfigDict):
        raise ConfigError(f"config {path}: get_config() returned {type(c).__name__}, not a ConfigDict")
    apply_overrides(c, overrides)
    c.lock()
    validate_config(c)
    return c


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate `--config.field=value` (or `--config.field value`) arguments from the others."""
    rest, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--config."):
            name, eq, text = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"--config.{name} needs a value")
                text, i = args[i + 1], i + 1
            overrides.append((name, text))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


_command_line_overrides: list[tuple[str, str]] = []  # set by parse_flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser for the commands that read a run config (`pfq.train`, `pfq.pretrain`,
    `pfq.plan`): the `--config.x.y=value` overrides are taken out first (`command_line_overrides()`,
    checked against the config's fields once it is loaded); a malformed one or an unknown flag stops
    here with exit status 2."""
    import sys

    from absl import flags

    try:
        rest, _command_line_overrides[:] = split_overrides(argv)
    except ConfigError as e:
        print(f"error: invalid config: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        return flags.FLAGS(rest)
    except flags.Error as e:
        print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr, flush=True)
        sys.exit(2)


def command_line_overrides() -> list[tuple[str, str]]:
    """The `--config.x.y=value` arguments `parse_flags` took from the command line."""
    return list(_command_line_overrides)
