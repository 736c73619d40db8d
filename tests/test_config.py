"""Configs: every field has a type and a domain, checked after the overrides with a message naming the
field; unknown fields suggest the close name; the packaged configs load by name, by path and from a
non-editable install."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from studykit import REPO, cli_env

from pfq.config import (
    FIELDS,
    ConfigError,
    _flatten,
    base_config,
    load_config,
    packaged_configs,
    paper_config,
    split_overrides,
    validate_config,
)

# field=value overrides that must be refused, by class; the message must name the field.
UNKNOWN = [
    ("optim.lrr", "1", "did you mean config.optim.lr?"),
    ("data.manifst", "x.csv", "config.data.manifest?"),
    ("sweep.seed", "(1,)", "config.sweep.seeds?"),
    ("checkpoint.every", "3", "checkpoint.every_steps?"),
    ("nonsense", "1", "is not a config field"),
]
WRONG_TYPE = [
    ("optim.steps", "abc"),
    ("optim.steps", "2.5"),
    ("sweep.seeds", "0"),
    ("sweep.seeds", "(2**40,)"),
    ("sweep.seeds", "(0.5,)"),
    ("data.input_size", "16"),
    ("data.test_fraction", "nan"),
    ("data.augment", "maybe"),
    ("export_models", "1"),
    ("model.remat_stages", "(True,)"),
    ("optim.lr", "inf"),
    ("sweep.train_sizes", "()"),
    ("sweep.inits", "()"),
]
OUT_OF_DOMAIN = [
    ("data.test_fraction", "-0.5"),
    ("data.test_fraction", "1.0"),
    ("sweep.bootstrap_resamples", "-5"),
    ("optim.warmup_steps", "-3"),
    ("checkpoint.keep", "0"),
    ("model.drop_path", "2.0"),
    ("data.workers", "-2"),
    ("optim.grad_clip", "-1"),
    ("sweep.test_draws", "0"),
    ("checkpoint.every_steps", "0"),
    ("log_every", "0"),
    ("data.input_size", "(8,8,8)"),
    ("sweep.seeds", "(1099511627776,)"),
    ("sweep.seeds", "(-1,)"),
    ("optim.steps", "0"),
    ("sweep.finetune_hq_ratios", "(0.5,1.5)"),
    ("sweep.train_sizes", "(0,)"),
    ("optim.lr", "0"),
]
NOT_A_CHOICE = [
    ("optim.mode", "bogus"),
    ("optim.loss", "bogus"),
    ("model.dtype", "float17"),
    ("task", "pirads"),
    ("model.depthwise", "fast"),
    ("model.size", "giant"),
    ("data.quality_scale", "piqual_v9"),
    ("model.remat_stages", "('light','none','none','heavy')"),
]
# Fields that are each valid but not together.
INCONSISTENT = [
    ([("model.depths", "()")], "config.model.depths and config.model.dims"),
    ([("task", "pirads_4class"), ("optim.loss", "bce")], "config.optim.loss"),
    ([("data.quality_threshold", "7")], "config.data.quality_threshold"),
    ([("data.spacing", "(100.0,1.0,1.0)")], "config.data.spacing"),
]


def refuse(overrides: list[tuple[str, str]], *fragments: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config("smoke", overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("name, text, hint", UNKNOWN)
def test_an_unknown_field_is_refused_with_the_close_name(name, text, hint):
    refuse([(name, text)], f"config.{name} is not a config field", hint)


@pytest.mark.parametrize("name, text", WRONG_TYPE)
def test_a_value_of_the_wrong_type_is_refused(name, text):
    refuse([(name, text)], f"config.{name}", "expected")


@pytest.mark.parametrize("name, text", OUT_OF_DOMAIN)
def test_a_value_outside_its_domain_is_refused(name, text):
    refuse([(name, text)], f"config.{name}", "expected")


@pytest.mark.parametrize("name, text", NOT_A_CHOICE)
def test_a_value_that_is_not_one_of_the_choices_is_refused(name, text):
    refuse([(name, text)], f"config.{name}", "expected")


@pytest.mark.parametrize("overrides, field", INCONSISTENT)
def test_fields_that_do_not_fit_together_are_refused(overrides, field):
    refuse(overrides, field)


@pytest.mark.parametrize(
    "name, value",
    [("data.test_fraction", float("nan")), ("sweep.seeds", 0), ("optim.mode", "bogus"), ("checkpoint.keep", 0)],
)
def test_a_config_file_is_checked_like_the_command_line(tmp_path, name, value):
    section, field = name.split(".")
    path = tmp_path / "mine.py"
    path.write_text(
        "from pfq.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.{section}.{field} = {value!r}\n    return c\n".replace("nan", "float('nan')")
    )
    with pytest.raises(ConfigError, match=field):  # ml_collections' own type check names only the leaf
        load_config(str(path))


def test_every_field_has_exactly_one_rule_and_every_shipped_config_passes():
    assert set(_flatten(base_config())) == set(FIELDS)
    assert set(packaged_configs()) >= {"default", "smoke", "pirads_binary", "pirads_4class", "isup", "cspca"}
    for name in packaged_configs():
        load_config(name)
    for task in ("pirads_ge4", "pirads_4class", "isup", "cspca"):
        validate_config(paper_config(task))


def test_the_config_is_locked_after_loading_and_overrides_keep_types():
    c = load_config(
        "smoke",
        [
            ("optim.lr", "1"),
            ("sweep.seeds", "[3, 4]"),
            ("sweep.inits", "models/x"),
            ("data.augment", "false"),
            ("data.quality_threshold", "3"),
        ],
    )
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.sweep.seeds == (3, 4) and c.sweep.inits == ("models/x",) and c.data.augment is False
    assert c.data.quality_threshold == 3.0
    with pytest.raises(AttributeError):
        c.optim.lrr = 1.0


def test_configs_load_by_name_and_by_path_alike():
    by_name = load_config("smoke")
    assert load_config(REPO / "configs" / "smoke.py").to_json() == by_name.to_json()
    assert load_config(REPO / "pfq" / "configs" / "smoke.py").to_json() == by_name.to_json()
    assert load_config().to_json() == load_config("default").to_json()
    with pytest.raises(ConfigError, match="not a packaged config .*smoke"):
        load_config("smok")
    with pytest.raises(ConfigError, match="no such file"):
        load_config("configs/missing.py")


def test_the_command_lines_exit_2_naming_the_field_and_change_nothing(tmp_path):
    """`--overwrite` on a finished workdir with a bad override: exit 2 before anything is touched."""
    workdir = tmp_path / "finished"
    workdir.mkdir()
    (workdir / "results.csv").write_text("kept\n")
    cases = [
        ("--config.optim.lrr=1", "config.optim.lrr is not a config field; did you mean config.optim.lr?"),
        ("--config.checkpoint.every_steps=0", "config.checkpoint.every_steps = 0: expected a value >= 1"),
        ("--config.optim.steps=abc", "config.optim.steps=abc: expected an integer"),
    ]
    for override, message in cases:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pfq.train",
                "--config",
                "smoke",
                override,
                "--overwrite",
                "--workdir",
                str(workdir),
                "--noprogress",
            ],
            env=cli_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in workdir.iterdir()) == ["results.csv"]
        assert (workdir / "results.csv").read_text() == "kept\n"
    from pfq.data.__main__ import main as data_main

    with pytest.raises(SystemExit) as info:
        data_main(["cache", "--config", "no_such_config"])
    assert info.value.code == 2


def test_a_non_editable_install_ships_the_configs(tmp_path):
    """`pip install .` (here into a target folder): the default config is found with no checkout around."""
    target, source = tmp_path / "site", tmp_path / "source"
    # Built from a copy, so that the build leaves nothing (build/, *.egg-info) in the checkout.
    shutil.copytree(REPO / "pfq", source / "pfq", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # With setuptools at hand, build without fetching it (fast, offline); else pip's isolated build.
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-compile",
        *offline,
        "--target",
        str(target),
        str(source),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600, cwd=tmp_path)
    env = {**cli_env(), "PYTHONPATH": str(target)}
    code = (
        "import pfq.config as c; cfg = c.load_config(); print(c.PACKAGED_CONFIGS); "
        "print(cfg.optim.steps, c.load_config('pirads_binary').model.size)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert Path(out[0]).is_relative_to(target) and out[1] == f"{load_config('default').optim.steps} tiny"
    proc = subprocess.run(
        [sys.executable, "-m", "pfq.train", "--workdir", str(tmp_path / "w"), "--config.optim.lrr=1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "did you mean config.optim.lr?" in proc.stderr, proc.stderr[-2000:]


def test_overrides_are_split_from_the_other_flags_in_both_spellings():
    rest, overrides = split_overrides(
        ["--config", "smoke", "--config.optim.steps", "5", "--config.sweep.seeds=(1,)", "--workdir", "w"]
    )
    assert rest == ["--config", "smoke", "--workdir", "w"]
    assert overrides == [("optim.steps", "5"), ("sweep.seeds", "(1,)")]
    with pytest.raises(ConfigError, match="needs a value"):
        split_overrides(["--config.optim.steps"])
