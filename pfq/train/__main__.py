"""`python -m pfq.train [--config NAME|FILE] [--config.x.y=value ...] [--workdir DIR]`

Runs a sweep end to end: data, vmapped lane training, one-pass evaluation, results.csv, report.
Rerunning in a workdir that holds checkpoints resumes where the last run stopped.

Exit status: 0 done; 2 a bad input (config, manifest, volume, set sizes, workdir, checkpoint to
start from), reported in one paragraph naming the field, row, case, column or file, with nothing in
the workdir changed; 1 a failed write (disk full, permissions) or every lane diverged, with the
checkpoints and earlier outputs intact so that a rerun resumes.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from absl import app, flags

from pfq import xla_flags
from pfq.config import ConfigError, command_line_overrides, load_config, parse_flags, validate_config

_CONFIG = flags.DEFINE_string(
    "config",
    "default",
    "A packaged config's name (default, smoke, pirads_binary, ...) "
    "or a config file (Python, get_config()); override fields with --config.x.y=value.",
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output folder: results.csv, figures, checkpoints.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Let JAX discover the cluster (TPU VM pods, SLURM).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard the workdir's checkpoints and results and start over.")

log = logging.getLogger("pfq.train")


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'fix the input', reported without a traceback."""
    from pfq.convert.errors import ConvertError
    from pfq.data.manifest import ManifestError
    from pfq.data.preprocess import VolumeError
    from pfq.data.stratify import StratificationError
    from pfq.tasks import LabelError
    from pfq.train.fit import DoesNotFitError
    from pfq.train.trainer import ModelBuildError
    from pfq.train.workdir import WorkdirError

    return (
        ManifestError,
        VolumeError,
        StratificationError,
        WorkdirError,
        ConvertError,
        LabelError,
        ModelBuildError,
        DoesNotFitError,
    )


def fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


class _NoLibraryTracebacks(logging.Filter):
    """Orbax (and asyncio, for Orbax's tasks) log tracebacks for a failed background write before pfq
    reports it in one line; keep their messages, drop the tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and ("orbax" in record.pathname or "orbax" in record.getMessage()):
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = " ".join(record.getMessage().split())[:400], ()
        return True


def _unraisable(hook_args) -> None:
    """After a failed asynchronous checkpoint write, the I/O library still completes its futures into
    Orbax's closed event loops, and Python would print a traceback for each; pfq reports the
    failure itself. Everything else goes to the default hook."""
    error = hook_args.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        sys.__unraisablehook__(hook_args)


def workdir_problem(workdir: Path) -> str | None:
    """Why `workdir` can never hold a run (a file, or under a file), checked before anything else."""
    if "\x00" in str(workdir):
        return f"--workdir {str(workdir)!r} contains a NUL byte"
    for path in (workdir, *workdir.absolute().parents):
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return None
            what = "is" if path == workdir else f"lies under {path}, which is"
            return f"--workdir {workdir} {what} not a folder; name a folder (it is created if missing)"
    return None


def run_sweep(config, workdir: Path, progress: bool = True, overwrite: bool = False) -> int:
    """Everything after flag parsing; returns the exit status (see the module docstring)."""
    from pfq.train.distributed import is_writer
    from pfq.train.trainer import SweepDivergedError, Trainer

    workdir = Path(workdir)
    t0 = time.perf_counter()
    problem = workdir_problem(workdir)
    if problem:
        return fail(problem, 2)
    try:
        validate_config(config)
        trainer = Trainer(config, workdir, progress=progress, overwrite=overwrite)  # task and model from the config
    except (ValueError, KeyError) as e:
        return fail(f"invalid config: {e}", 2)
    try:
        rows = trainer.run()
        if not is_writer():
            return 0
        from pfq.report import summary_table, write_report  # scipy and matplotlib: only once results exist

        write_report(workdir)
    except input_errors() as e:
        return fail(str(e), 2)
    except SweepDivergedError as e:
        return fail(str(e), 1)
    except OSError as e:  # a full disk, a read-only folder: what was written before is intact
        return fail(
            f"{e}\nCheckpoints and outputs written before this error are intact; fix the cause and "
            f"rerun the same command to resume.",
            1,
        )
    print(summary_table(rows))
    print(
        f"\n{len(rows)} result rows in {workdir / 'results.csv'}; report {workdir / 'report.md'} and figures; "
        f"{trainer.compile_count} compiled step program(s); {time.perf_counter() - t0:.0f} s"
    )
    return 0


def setup_process():
    """Logging, the unraisable hook, the config (file plus overrides) and, for multi-host runs,
    jax.distributed; returns the config, or an exit status for a bad one."""
    sys.unraisablehook = _unraisable
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax", "grain", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger(noisy).addFilter(_NoLibraryTracebacks())
    try:
        config = load_config(_CONFIG.value, command_line_overrides())
    except ConfigError as e:
        return fail(f"invalid config: {e}", 2)
    from pfq.train import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    return config


def main(argv: list[str]) -> int:
    del argv
    config = setup_process()
    if isinstance(config, int):
        return config
    return run_sweep(config, Path(_WORKDIR.value), progress=_PROGRESS.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    app.run(main, flags_parser=parse_flags)
