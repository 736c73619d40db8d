"""`python -m pfq.data {synth,prepare,validate} ...`: data tools.

  synth     write a synthetic phantom set (NIfTI + manifest)
  prepare   preprocess every case of a manifest into the cache that training reads
  validate  check every row of a manifest; one line per problem, non-zero exit on any
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

from pfq.config import base_config


def _run_config(path: str | None):
    """A config file's `get_config()` (as `python -m pfq.train --config` reads it), else the base."""
    if path is None:
        return base_config()
    spec = importlib.util.spec_from_file_location("pfq_user_config", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _add_quality_args(p: argparse.ArgumentParser) -> None:
    from pfq.data.manifest import QUALITY_SCALES

    p.add_argument("--quality-scale", choices=sorted(QUALITY_SCALES), default=None,
                   help="how numeric `quality` scores are read (default: the config's, piqual_v1)")
    p.add_argument("--quality-threshold", type=float, default=None, metavar="T",
                   help="scores at or above this are HQ (default: the scale's, v1: 4, v2: 3)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pfq.data",
                                     description="Data tools: write phantoms (synth), fill the preprocessing cache "
                                                 "(prepare), check a manifest before training (validate).")
    sub = parser.add_subparsers(dest="command", metavar="{synth,prepare,validate}")
    sub.add_parser("synth", help="write a synthetic phantom set (see `python -m pfq.data synth --help`)",
                   add_help=False)

    prep = sub.add_parser("prepare", help="preprocess a manifest into the cache that training reads",
                          description="Decode and preprocess every case once into the cache. Use the run's "
                                      "config (--config) so that training finds the entries.")
    prep.add_argument("manifest", type=Path)
    prep.add_argument("--cache", type=Path, default=None,
                      help="cache folder (default: the config's data.cache_dir, else $PFQ_CACHE/volumes "
                           "or ~/.cache/pfq/volumes)")
    prep.add_argument("--config", default=None, help="run config file whose data.input_size / data.spacing to use")
    prep.add_argument("--input-size", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                      help="override data.input_size")
    prep.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                      help="override data.spacing (mm); default: the config's (none: no resampling)")
    prep.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (0: this process)")
    prep.add_argument("--no-progress", action="store_true")

    val = sub.add_parser("validate", help="check every row of a manifest before training",
                         description="Check every row: files exist and are readable 3-D NIfTI, finite, non-empty, "
                                     "sane spacing, grids compatible or resamplable, labels valid for the task, "
                                     "quality valid, case ids unique. Prints one line per problem; exit status 1 "
                                     "if there is any.")
    val.add_argument("manifest", type=Path)
    val.add_argument("--task", default=None, help="check the labels this task reads (e.g. pirads_ge4); "
                                                  "default: labels are not checked")
    _add_quality_args(val)
    val.add_argument("--no-quality", action="store_true", help="the manifest has no quality column")
    val.add_argument("--no-images", action="store_true", help="check the CSV only, do not open images")
    val.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes for the image checks")
    val.add_argument("--no-progress", action="store_true")
    return parser


def _prepare(args) -> int:
    from pfq.data.cache import VolumeCache, default_cache_root
    from pfq.data.manifest import ManifestError, read_manifest
    from pfq.data.preprocess import PreprocessConfig

    data = _run_config(args.config).data
    if args.input_size:
        data.input_size = tuple(args.input_size)
    if args.spacing:
        data.spacing = tuple(args.spacing)
    config = PreprocessConfig.from_config(data)
    root = args.cache or Path(data.get("cache_dir") or default_cache_root())
    try:
        manifest = read_manifest(args.manifest, require_quality=False)
    except ManifestError as e:
        for problem in e.problems:
            print(f"{args.manifest}: {problem}")
        return 1
    _, problems = VolumeCache(root, config).prepare(manifest.cases, workers=args.workers,
                                                     progress=not args.no_progress)
    for problem in problems:
        print(f"{args.manifest}: {problem}")
    failed = len({p.line for p in problems})
    print(f"{len(manifest) - failed}/{len(manifest)} cases cached in {root} (input {tuple(config.input_size)}, "
          f"spacing {config.spacing or 'native'})", file=sys.stderr)
    return 1 if problems else 0


def _validate(args) -> int:
    from pfq.data.validate import validate_manifest
    from pfq.tasks import get_task

    data = base_config().data
    try:
        task = get_task(args.task) if args.task else None
        report = validate_manifest(args.manifest, task=task, quality_scale=args.quality_scale or data.quality_scale,
                                   quality_threshold=args.quality_threshold, require_quality=not args.no_quality,
                                   check_images=not args.no_images, workers=args.workers,
                                   progress=not args.no_progress)
    except ValueError as e:  # an unknown task, scale or threshold
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"{args.manifest}: {problem}")
    if not report.ok:
        print(f"{len(report.problems)} problem(s) in {args.manifest}", file=sys.stderr)
        return 1
    manifest = report.manifest
    quality = Counter(c.quality or "none" for c in manifest.cases)
    summary = f"OK: {len(manifest)} cases; quality {dict(sorted(quality.items()))}"
    if task is not None:
        summary += f"; {task.name} classes {dict(sorted(Counter(int(x) for x in report.labels).items()))}"
    else:
        summary += "; labels not checked (pass --task)"
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":  # the phantom generator owns its arguments
        try:
            from pfq.data.phantoms import synth_main
        except ImportError as e:
            print(f"error: the phantom generator is not available ({e})", file=sys.stderr)
            return 2
        return synth_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "validate":
        return _validate(args)
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
