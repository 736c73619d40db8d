"""`python -m pfq.train [--config FILE] [--config.x.y=value ...] [--workdir DIR]`

Runs a sweep end to end: data, vmapped lane training, one-pass evaluation, results.csv, report.
Rerunning in a workdir that holds checkpoints resumes where the last run stopped.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from pfq.config import validate_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.py"

_CONFIG = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (Python, get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output folder: results.csv, figures, checkpoints.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard the workdir's checkpoints and results and start over.")


def main(argv: list[str]) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = _CONFIG.value
    validate_config(config)
    from pfq.report import summary_table, write_report
    from pfq.train.trainer import Trainer

    workdir = Path(_WORKDIR.value)
    t0 = time.perf_counter()
    trainer = Trainer(config, workdir, progress=_PROGRESS.value, overwrite=_OVERWRITE.value)
    rows = trainer.run()
    write_report(workdir)
    print(summary_table(rows))
    print(f"\n{len(rows)} result rows in {workdir / 'results.csv'}; report {workdir / 'report.md'} and figures; "
          f"{trainer.compile_count} compiled step program(s); {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    app.run(main)
