"""`python -m pfq.pretrain [--config FILE] [--config.pretrain.x=value ...] [--workdir DIR]`

Self-supervised FCMAE pretraining of ProFound-Conv on unlabelled cases (`config.pretrain`, every field
in `pfq/config.py`): a manifest's cases, or by default a phantom pool of its own. Writes DIR/model/
(finetune from it with `--config.sweep.inits='("DIR/model","scratch")'`), DIR/fcmae.safetensors
(upstream's FCMAE checkpoint layout), loss.csv, loss.png and reconstruction.png. Rerunning the same
command resumes an interrupted pretraining. Flags and exit statuses as `python -m pfq.train`.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

from pfq import xla_flags
from pfq.config import parse_flags
from pfq.train.__main__ import _OVERWRITE, _PROGRESS, _WORKDIR, fail, input_errors, setup_process

DEFAULT_WORKDIR = "runs/pretrain"


def run_pretraining(config, workdir: Path, progress: bool = True, overwrite: bool = False) -> int:
    """Everything after flag parsing; returns the exit status."""
    from pfq.pretrain.pretrainer import Pretrainer, validate_pretrain_config

    t0 = time.perf_counter()
    try:
        validate_pretrain_config(config)
        pretrainer = Pretrainer(config, workdir, progress=progress, overwrite=overwrite)
    except (ValueError, KeyError) as e:
        return fail(f"invalid config: {e}", 2)
    try:
        model = pretrainer.run()
    except input_errors() as e:
        return fail(str(e), 2)
    except FloatingPointError as e:
        return fail(str(e), 1)
    except OSError as e:
        return fail(
            f"{e}\nCheckpoints written before this error are intact; fix the cause and rerun the same "
            "command to resume.",
            1,
        )
    print(
        f"pretrained encoder in {model}; format-B checkpoint {Path(workdir) / 'fcmae.safetensors'}; "
        f"loss.csv, loss.png, reconstruction.png in {workdir}; {time.perf_counter() - t0:.0f} s"
    )
    return 0


def main(argv: list[str]) -> int:
    del argv
    config = setup_process()
    if isinstance(config, int):
        return config
    workdir = _WORKDIR.value if flags.FLAGS["workdir"].present else DEFAULT_WORKDIR
    return run_pretraining(config, Path(workdir), progress=_PROGRESS.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
    xla_flags.set_defaults()  # before JAX starts its backend
    app.run(main, flags_parser=parse_flags)
