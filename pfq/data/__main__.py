"""`python -m pfq.data {synth,prepare,validate,iqm,grade,cache} ...`: data tools.

synth     write a synthetic phantom set (NIfTI + manifest)
prepare   preprocess every case of a manifest into the cache that training reads
validate  check every row of a manifest; one line per problem, non-zero exit on any
iqm       image-quality metrics per case (CSV)
grade     HQ/LQ grades from the metrics: the manifest with quality, quality_score, quality_source
cache     show the preprocessing cache's size; with --prune, remove least recently used entries
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from pfq import xla_flags
from pfq.config import ConfigError, base_config, load_config


def _run_config(source: str | None):
    """The run config `python -m pfq.train --config` would read (a name or a file; None: default)."""
    try:
        return load_config(source)
    except ConfigError as e:
        print(f"error: invalid config: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _add_quality_args(p: argparse.ArgumentParser) -> None:
    from pfq.data.manifest import QUALITY_SCALES

    p.add_argument(
        "--quality-scale",
        choices=sorted(QUALITY_SCALES),
        default=None,
        help="how numeric `quality` scores are read (default: the config's, piqual_v1)",
    )
    p.add_argument(
        "--quality-threshold",
        type=float,
        default=None,
        metavar="T",
        help="scores at or above this are HQ (default: the scale's, v1: 4, v2: 3)",
    )


def _add_cache_args(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: the config's data.cache_dir, else $PFQ_CACHE/volumes or ~/.cache/pfq/volumes)",
    )
    p.add_argument("--config", default=None, help=config_help)


def _add_cache_parser(sub) -> None:
    cache = sub.add_parser(
        "cache",
        help="show the preprocessing cache; --prune removes least recently used entries",
        description="Entries, size and last use per input size. With --prune, remove the least "
        "recently used entries (--older-than and/or --max-gb) and temporaries that "
        "killed writers left; entries used within --keep-recent-hours are kept, "
        "as a running sweep reads its entries throughout. A removed entry is "
        "rebuilt from the NIfTI files when next needed.",
    )
    _add_cache_args(cache, "run config file whose data.cache_dir to use")
    cache.add_argument("--prune", action="store_true", help="remove entries (else only report)")
    cache.add_argument(
        "--older-than", type=float, default=None, metavar="DAYS", help="--prune: entries unused for this many days"
    )
    cache.add_argument(
        "--max-gb",
        type=float,
        default=None,
        metavar="GB",
        help="--prune: then the least recently used until the cache fits in this size",
    )
    cache.add_argument(
        "--keep-recent-hours",
        type=float,
        default=24.0,
        metavar="H",
        help="--prune: never remove entries used within this many hours (default 24)",
    )
    cache.add_argument("--dry-run", action="store_true", help="--prune: list what would go, remove nothing")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pfq.data",
        description="Data tools: write phantoms (synth), fill the preprocessing cache "
        "(prepare), check a manifest before training (validate), measure "
        "image quality (iqm), grade cases HQ/LQ from it (grade), show or "
        "prune the cache (cache).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{synth,prepare,validate,iqm,grade,cache}")
    sub.add_parser(
        "synth", help="write a synthetic phantom set (see `python -m pfq.data synth --help`)", add_help=False
    )

    prep = sub.add_parser(
        "prepare",
        help="preprocess a manifest into the cache that training reads",
        description="Decode and preprocess every case once into the cache. Use the run's "
        "config (--config) so that training finds the entries.",
    )
    prep.add_argument("manifest", type=Path)
    _add_cache_args(prep, "run config (a name or a file) whose data.input_size / data.spacing to use")
    prep.add_argument(
        "--input-size", type=int, nargs=3, metavar=("D", "H", "W"), default=None, help="override data.input_size"
    )
    prep.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("D", "H", "W"),
        default=None,
        help="override data.spacing (mm); default: the config's (none: no resampling)",
    )
    prep.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (0: this process)")
    prep.add_argument("--no-progress", action="store_true")

    val = sub.add_parser(
        "validate",
        help="check every row of a manifest before training",
        description="Check every row: files exist and are readable 3-D NIfTI, finite, non-empty, "
        "sane spacing, grids compatible or resamplable, known label columns within their "
        "domains, labels valid for the task, "
        "quality valid, case ids unique. Prints one line per problem; exit status 1 "
        "if there is any.",
    )
    val.add_argument("manifest", type=Path)
    val.add_argument(
        "--task",
        default=None,
        help="also check that every row has a label this task accepts "
        "(e.g. pirads_ge4); known label columns (pirads, isup, "
        "gleason, case_csPCa) are checked against their domains always",
    )
    _add_quality_args(val)
    val.add_argument("--no-quality", action="store_true", help="the manifest has no quality column")
    val.add_argument("--no-images", action="store_true", help="check the CSV only, do not open images")
    val.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes for the image checks")
    val.add_argument("--no-progress", action="store_true")

    _add_quality_parsers(sub)
    _add_cache_parser(sub)
    return parser


def _add_quality_parsers(sub) -> None:
    iqm = sub.add_parser(
        "iqm",
        help="image-quality metrics per case (CSV)",
        description="Measure every case's image quality on its native intensities "
        "(measures: pfq/data/iqm.py, docs/quality.md). One row per case in manifest "
        "order; a case that cannot be read gets empty measures and its error, and "
        "every problem is printed with its line, case, column and file (exit status 2). "
        "Measures are cached per case under the cache root.",
    )
    iqm.add_argument("manifest", type=Path)
    iqm.add_argument("--out", type=Path, required=True, help="output CSV")
    _add_cache_args(iqm, "run config file whose data.cache_dir to use")
    iqm.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (0: this process)")
    iqm.add_argument("--no-progress", action="store_true")

    grade = sub.add_parser(
        "grade",
        help="grade every case HQ/LQ from its image-quality metrics",
        description="Write the manifest with `quality` (labels kept where present, else the "
        "grader's), `quality_score` (higher is better; P(HQ) when fitted) and "
        "`quality_source` (label or iqm). A logistic regression is fitted on the "
        "labelled rows when there are enough (its cross-validated AUC is printed); "
        "otherwise an unsupervised composite with a two-component mixture decides "
        "(or --lq-fraction). Every input column and the row order are kept; relative "
        "image paths are rewritten relative to --out's folder.",
    )
    grade.add_argument("manifest", type=Path)
    grade.add_argument("--out", type=Path, required=True, help="graded manifest (CSV)")
    _add_cache_args(grade, "run config file whose data.cache_dir to use")
    _add_quality_args(grade)
    grade.add_argument("--threshold", type=float, default=0.5, help="fitted grader: P(HQ) at or above this is HQ")
    grade.add_argument(
        "--lq-fraction",
        type=float,
        default=None,
        metavar="F",
        help="unsupervised: the F worst cases are LQ (default: a two-component mixture decides)",
    )
    grade.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes for the measures")
    grade.add_argument("--no-progress", action="store_true")


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
    root = args.cache or Path(data.cache_dir or default_cache_root())
    try:
        manifest = read_manifest(args.manifest, require_quality=False)
    except ManifestError as e:
        for problem in e.problems:
            print(f"{args.manifest}: {problem}")
        return 1
    _, problems = VolumeCache(root, config).prepare(manifest.cases, workers=args.workers, progress=not args.no_progress)
    for problem in problems:
        print(f"{args.manifest}: {problem}")
    failed = len({p.line for p in problems})
    print(
        f"{len(manifest) - failed}/{len(manifest)} cases cached in {root} (input {tuple(config.input_size)}, "
        f"spacing {config.spacing or 'native'})",
        file=sys.stderr,
    )
    return 1 if problems else 0


def _validate(args) -> int:
    from pfq.data.validate import validate_manifest
    from pfq.tasks import get_task

    data = base_config().data
    try:
        task = get_task(args.task) if args.task else None
        report = validate_manifest(
            args.manifest,
            task=task,
            quality_scale=args.quality_scale or data.quality_scale,
            quality_threshold=args.quality_threshold,
            require_quality=not args.no_quality,
            check_images=not args.no_images,
            workers=args.workers,
            progress=not args.no_progress,
        )
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
        summary += "; known label columns within their domains (pass --task to check a task's labels)"
    print(summary)
    return 0


def _quality_inputs(args, require_quality: bool = False):
    """(manifest, IQM rows or None per case, problems) for the iqm and grade commands."""
    from pfq.data.cache import default_cache_root
    from pfq.data.iqm import manifest_iqms
    from pfq.data.manifest import parse_manifest

    config = _run_config(args.config)
    root = args.cache or Path(config.data.get("cache_dir") or default_cache_root())
    scale = getattr(args, "quality_scale", None) or config.data.quality_scale
    manifest, problems = parse_manifest(
        args.manifest,
        quality_scale=scale,
        quality_threshold=getattr(args, "quality_threshold", None),
        require_quality=require_quality,
    )
    if manifest is None:
        return None, [], problems
    rows, found = manifest_iqms(manifest.cases, root, workers=args.workers, progress=not args.no_progress)
    return manifest, rows, sorted(problems + found, key=lambda p: p.line if p.line is not None else 0)


def _report_problems(path: Path, problems) -> None:
    for problem in problems:
        print(f"{path}: {problem}")
    print(f"{len(problems)} problem(s) in {path}", file=sys.stderr)


def _iqm(args) -> int:
    from pfq.data.iqm import HEADER_NAMES, iqm_names
    from pfq.data.tables import write_csv_atomic

    try:
        manifest, rows, problems = _quality_inputs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest is None:
        _report_problems(args.manifest, problems)
        return 2
    errors = {}
    for p in problems:
        errors.setdefault(p.line, []).append(p.message)
    columns = ["case_id", "line", *iqm_names(), *HEADER_NAMES, "error"]
    out = []
    for case, values in zip(manifest.cases, rows, strict=True):
        row = {"case_id": case.case_id, "line": case.line, "error": "; ".join(errors.get(case.line, []))}
        row.update({k: "" if values is None else f"{values[k]:.6g}" for k in columns[2:-1]})
        out.append(row)
    write_csv_atomic(args.out, columns, out)
    measured = sum(v is not None for v in rows)
    print(f"{args.out}: {measured}/{len(rows)} cases measured")
    if problems:
        _report_problems(args.manifest, problems)
        return 2
    return 0


def _grade(args) -> int:
    from pfq.data.grade import grade
    from pfq.data.tables import graded_manifest_rows, write_csv_atomic

    if not 0.0 < args.threshold < 1.0 or (args.lq_fraction is not None and not 0.0 <= args.lq_fraction <= 1.0):
        print("error: --threshold must be in (0, 1) and --lq-fraction in [0, 1]", file=sys.stderr)
        return 2
    try:
        manifest, rows, problems = _quality_inputs(args)
        if manifest is not None and not problems:
            result = grade(
                rows, [c.quality for c in manifest.cases], threshold=args.threshold, lq_fraction=args.lq_fraction
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if manifest is None or problems:
        _report_problems(args.manifest, problems)
        print("nothing written: every case needs its measures to be graded", file=sys.stderr)
        return 2
    header, out = graded_manifest_rows(args.manifest, args.out, result)
    write_csv_atomic(args.out, header, out)
    summary = result.summary()
    n, n_hq = summary["n"], summary["n_hq"]
    line = (
        f"{args.out}: {n} cases, {n_hq} hq / {n - n_hq} lq ({summary['n_from_iqm']} graded from image quality, "
        f"{summary['n_labelled']} labelled); {summary['method']}"
    )
    if result.cv_auc is not None:
        line += f", cross-validated AUC {result.cv_auc:.3f} on the labelled cases"
    print(line)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def _day(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _cache(args) -> int:
    from pfq.data.cache import cache_entries, default_cache_root, select_for_pruning, stale_temporaries

    root = args.cache or Path(_run_config(args.config).data.cache_dir or default_cache_root())
    if args.prune and args.older_than is None and args.max_gb is None:
        print("error: --prune needs --older-than DAYS and/or --max-gb GB", file=sys.stderr)
        return 2
    if any(v is not None and v < 0 for v in (args.older_than, args.max_gb)) or args.keep_recent_hours < 0:
        print("error: --older-than, --max-gb and --keep-recent-hours must not be negative", file=sys.stderr)
        return 2
    entries = cache_entries(root)
    print(f"{root}: {len(entries)} entries, {_gb(sum(e.size for e in entries))}")
    by_shape: dict[str, list] = {}
    for e in entries:
        by_shape.setdefault("x".join(map(str, e.shape)) if e.shape else "unreadable", []).append(e)
    for shape, group in sorted(by_shape.items()):
        print(
            f"  {shape}: {len(group)} entries, {_gb(sum(e.size for e in group))}, last used "
            f"{_day(min(e.last_used for e in group))} .. {_day(max(e.last_used for e in group))}"
        )
    if not args.prune:
        return 0
    now = time.time()
    max_bytes = None if args.max_gb is None else int(args.max_gb * 1e9)
    chosen = select_for_pruning(
        entries, now=now, older_than_days=args.older_than, max_bytes=max_bytes, keep_recent_hours=args.keep_recent_hours
    )
    temporaries = stale_temporaries(root, now=now)
    freed = sum(e.size for e in chosen)
    if not args.dry_run:
        for path in [e.path for e in chosen] + temporaries:
            path.unlink(missing_ok=True)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {len(chosen)} entries ({_gb(freed)}) and {len(temporaries)} stale temporary file(s); "
        f"{_gb(sum(e.size for e in entries) - freed)} left"
    )
    if max_bytes is not None and sum(e.size for e in entries) - freed > max_bytes:
        print(
            f"note: entries used within the last {args.keep_recent_hours:g} h were kept, so the cache is still "
            f"above {args.max_gb:g} GB",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":  # the phantom generator owns its arguments
        try:
            from pfq.data.phantom_set import synth_main
        except ImportError as e:
            print(f"error: the phantom generator is not available ({e})", file=sys.stderr)
            return 2
        return synth_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "validate":
        return _validate(args)
    if args.command == "iqm":
        return _iqm(args)
    if args.command == "grade":
        return _grade(args)
    if args.command == "cache":
        return _cache(args)
    _parser().print_help()
    return 2


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    sys.exit(main())
