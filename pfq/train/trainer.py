"""The trainer: data -> lanes -> one compiled step per lane group -> one-pass evaluation -> results.

Read top to bottom; each section is one stage of the data flow. Everything random derives from a
lane's seed, so a lane's numbers do not depend on which other lanes ran beside it, and a run killed
at any point resumes from its last checkpoint to the same final results.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pfq import baseline, evaluate
from pfq.convert.errors import ConvertError
from pfq.data.pipeline import AugmentConfig, to_iterator, train_dataset
from pfq.data.preprocess import PreprocessConfig
from pfq.data.stratify import StratificationError, stratified_indices
from pfq.data.study import StudyData, load_study_data
from pfq.faults import maybe_fail
from pfq.io import atomic_write_text
from pfq.model import ModelSpec, init_variables
from pfq.results import read_results
from pfq.tasks import Task, get_task
from pfq.train import fingerprint, fit, program
from pfq.train import lanes as lanes_lib
from pfq.train import workdir as workdir_lib
from pfq.train.checkpoint import GroupCheckpointer
from pfq.train.distributed import is_writer, local_box, to_host
from pfq.train.loop import train_loop
from pfq.train.optim import make_optimizer
from pfq.train.step import DIVERGED_REASONS, init_state, make_predict_step, make_train_step

log = logging.getLogger("pfq.train")


class SweepDivergedError(RuntimeError):
    """Every lane of the sweep diverged; their state is saved, no results are written."""


class ModelBuildError(ValueError):
    """The config cannot make a trainable model (found by tracing it before anything is written)."""


# ----------------------------------------------------------------------------------------------
# Small helpers: CSV output and the model spec.
# ----------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict]) -> None:
    """Atomically write rows (all keys become columns, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def model_spec(config, num_classes: int) -> ModelSpec:
    m = config.model
    kwargs = dict(
        in_chans=3,
        num_classes=num_classes,
        drop_path_rate=m.drop_path,
        depthwise_impl=m.depthwise,
        dtype=m.dtype,
        remat_stages=tuple(m.remat_stages),
    )
    if m.depths and m.dims:
        return ModelSpec(depths=tuple(m.depths), dims=tuple(m.dims), **kwargs)
    return ModelSpec.from_size(m.size, **kwargs)


# ----------------------------------------------------------------------------------------------
# Lanes: finetuning sets and initial variables.
# ----------------------------------------------------------------------------------------------
def lane_training_set(lane: lanes_lib.Lane, data: StudyData, num_classes: int) -> np.ndarray:
    pool = data.train_pool
    try:
        chosen = stratified_indices(
            data.is_hq[pool],
            data.labels[pool],
            lane.train_size,
            lane.finetune_hq_ratio,
            lane.seed,
            num_classes=num_classes,
        )
    except StratificationError as e:
        raise StratificationError(
            f"config.sweep.train_sizes / finetune_hq_ratios: lane {lane.name} asks for "
            f"{lane.train_size} finetuning cases at HQ ratio {lane.finetune_hq_ratio:g} "
            f"from a finetuning pool of {len(pool)}: {e}"
        ) from None
    return pool[chosen]


def load_init(init: str, spec: ModelSpec) -> dict:
    """A converted checkpoint directory's variables, checked against the config's model."""
    from pfq.convert.store import load_model_dir

    try:
        ckpt_spec, ckpt_vars, _ = load_model_dir(init)
    except ConvertError as e:
        raise ConvertError(f"config.sweep.inits: {e}", e.problems) from None
    fields = ("depths", "dims", "in_chans")
    wrong = [
        f"{f}={getattr(ckpt_spec, f)} (config.model asks for {getattr(spec, f)})"
        for f in fields
        if tuple(np.atleast_1d(getattr(ckpt_spec, f))) != tuple(np.atleast_1d(getattr(spec, f)))
    ]
    if wrong:
        raise ConvertError(
            f"config.sweep.inits: checkpoint {init} does not fit the configured model: " + "; ".join(wrong)
        )
    return ckpt_vars


def lane_variables(lane: lanes_lib.Lane, spec: ModelSpec, loaded: dict | None = None) -> dict:
    """Fresh head (and encoder, for scratch) from the lane's seed; pretrained lanes take the encoder
    from a converted checkpoint directory (`loaded`: its variables, when already read)."""
    variables = init_variables(spec, jax.random.key(lane.seed))
    if lane.init != "scratch":
        ckpt_vars = loaded if loaded is not None else load_init(lane.init, spec)
        variables["params"]["encoder"] = ckpt_vars["params"]["encoder"]
    return variables


def stack(trees: list) -> object:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


# ----------------------------------------------------------------------------------------------
# Training one lane group with one compiled, vmapped step.
# ----------------------------------------------------------------------------------------------
@dataclass
class GroupOutcome:
    lanes: list[lanes_lib.Lane]
    lane_sets: list[np.ndarray]
    state: dict
    diverged_step: np.ndarray
    last_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    diverged_reason: np.ndarray | None = None  # indices into step.DIVERGED_REASONS


class Trainer:
    def __init__(self, config, workdir: Path, progress: bool = True, overwrite: bool = False):
        self.config, self.workdir, self.progress, self.overwrite = config, Path(workdir), progress, overwrite
        self.task: Task = get_task(config.task)
        self.spec = model_spec(config, self.task.num_classes)
        self.compile_count = 0
        self._inits: dict[str, dict] = {}  # converted checkpoint dir -> variables, read once in preflight

    def train_group(self, gi: int, group: list[lanes_lib.Lane], data: StudyData) -> GroupOutcome:
        cfg, optim = self.config, self.config.optim
        steps, batch_size = int(optim.steps), int(optim.batch_size)
        lane_sets = [lane_training_set(lane, data, self.task.num_classes) for lane in group]
        mesh = lanes_lib.make_mesh(len(group), batch_size)
        lane_sh, batch_sh = lanes_lib.lane_sharding(mesh), lanes_lib.batch_sharding(mesh)

        variables = stack([lane_variables(lane, self.spec, self._inits.get(lane.init)) for lane in group])
        single_params = jax.tree.map(lambda x: x[0], variables["params"])
        tx = make_optimizer(optim, single_params, self.spec.depths, steps)
        state = jax.jit(jax.vmap(lambda v: init_state(v, tx)), out_shardings=lane_sh)(variables)
        lane_keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), 1))
        keys = jax.jit(lane_keys, out_shardings=lane_sh)(np.array([lane.seed for lane in group], np.uint32))

        box = local_box(batch_sh, (len(group), batch_size))  # this host loads only what its devices hold
        if jax.process_count() > 1:
            log.info(
                "group %d: this process loads lanes %d:%d, slots %d:%d of each step's batch",
                gi,
                box[0].start,
                box[0].stop,
                box[1].start,
                box[1].stop,
            )
        dataset = train_dataset(
            data.source,
            data.labels,
            lane_sets,
            [lane.seed for lane in group],
            batch_size=batch_size,
            num_steps=steps,
            augment_config=AugmentConfig.from_config(cfg.data),
            balance=cfg.data.balance,
            is_hq=data.is_hq,
            exact_quality=cfg.data.exact_batch_quality,
            box=box,
        )
        iterator = to_iterator(dataset, workers=cfg.data.workers)

        ckpt = GroupCheckpointer(self.workdir / "checkpoints" / f"group{gi}", keep=cfg.checkpoint.keep)
        try:
            state, loss = self._train_loop(gi, group, ckpt, state, tx, keys, iterator, lane_sh, batch_sh)
            ckpt.wait()
        except BaseException:
            try:  # let saves already under way finish: they hold finished work
                ckpt.close()
            except Exception as e:
                log.warning("group %d: a pending checkpoint could not be finished either (%s)", gi, e)
            raise
        ckpt.close()
        return GroupOutcome(
            group, lane_sets, state, to_host(state["diverged_step"]), loss, to_host(state["diverged_reason"])
        )

    def _train_loop(self, gi, group, ckpt, state, tx, keys, iterator, lane_sh, batch_sh):
        """Resume from the newest readable checkpoint, then train to `optim.steps`, saving as configured."""
        cfg, optim = self.config, self.config.optim
        spec = program.batch_spec(len(group), int(optim.batch_size), cfg.data.input_size, batch_sh)
        state, loss, compiled = train_loop(
            f"group {gi}",
            ckpt,
            state,
            program.jit_train_step(self.spec, tx, optim.loss, lane_sh),
            keys,
            iterator,
            spec,
            batch_sh=batch_sh,
            steps=int(optim.steps),
            log_every=cfg.log_every,
            save_every=cfg.checkpoint.every_steps,
            progress=self.progress,
        )
        self.compile_count += int(compiled)
        return state, loss

    # ------------------------------------------------------------------------------------------
    # One-pass prediction: every lane predicts every test-pool case once.
    # ------------------------------------------------------------------------------------------
    def predict_pool(self, outcome: GroupOutcome, data: StudyData) -> np.ndarray:
        """(lanes, len(test_pool), classes) probabilities."""
        predict = program.jit_predict_step(self.spec)
        variables = {"params": outcome.state["params"], "batch_stats": outcome.state["batch_stats"]}

        def forward(x: np.ndarray) -> np.ndarray:
            out = to_host(predict(variables, x))
            maybe_fail("predict_batch")
            return out

        probs = evaluate.predict(
            forward,
            data.source,
            data.test_pool,
            int(self.config.eval_batch_size),
            batch_axis=1,
            progress=self.progress,
            desc="predict test pool",
        )
        return probs.astype(np.float32, copy=False)

    # ------------------------------------------------------------------------------------------
    def preflight(self, lanes: list[lanes_lib.Lane], data: StudyData) -> evaluate.ScoringPlan:
        """Every check that can fail on the inputs, before anything in the workdir is written or
        discarded: each lane's finetuning set, the test subsets (returned), the initial checkpoints,
        and the model the config describes (`preflight_model`)."""
        for lane in lanes:
            lane_training_set(lane, data, self.task.num_classes)
        try:
            plan = evaluate.scoring_plan(
                data.is_hq[data.test_pool], data.labels[data.test_pool], self.config.sweep, self.task.num_classes
            )
        except StratificationError as e:
            raise StratificationError(
                f"config.sweep.test_size / test_hq_ratios: test pool of {len(data.test_pool)} cases: {e}"
            ) from None
        for init in dict.fromkeys(lane.init for lane in lanes if lane.init != "scratch"):
            self._inits[init] = load_init(self.init_dir(init), self.spec)
        self.preflight_model(max(len(g) for g in lanes_lib.group_lanes(lanes, int(self.config.sweep.lanes_per_group))))
        return plan

    def preflight_model(self, num_lanes: int) -> None:
        """Trace the model, optimiser, train step and predict step on abstract inputs (shapes only:
        about a second, nothing compiled or allocated), so that a config that cannot make a model
        (an input too small for the downsampling, an unknown dtype or loss) stops here, before
        `--overwrite` discards anything."""
        cfg, optim = self.config, self.config.optim
        try:  # the trainer's own abstract group and batch, unsharded (no mesh is needed to trace)
            tx, state, keys = program.abstract_group(self.spec, optim, num_lanes, None)
            batch = program.batch_spec(num_lanes, int(optim.batch_size), cfg.data.input_size, None)
            jax.eval_shape(jax.vmap(make_train_step(self.spec, tx, optim.loss)), state, batch, keys)
            images = jax.ShapeDtypeStruct((int(cfg.eval_batch_size),) + batch["image"].shape[2:], jnp.float32)
            jax.eval_shape(
                jax.vmap(make_predict_step(self.spec), in_axes=(0, None)),
                {"params": state["params"], "batch_stats": state["batch_stats"]},
                images,
            )
        except Exception as e:  # shape, dtype and name errors surface while tracing
            text = " ".join(str(e).split())[:400]
            raise ModelBuildError(
                f"config.model / config.data.input_size / config.optim: no model can be built "
                f"and trained for this config ({type(e).__name__}: {text})"
            ) from None

    def init_dir(self, init: str) -> str:
        """A checkpoint directory, or for the keyword "fcmae" this config's cached FCMAE pretraining."""
        from pfq.pretrain.pretrainer import PRETRAINED_INIT, cached_pretraining

        return str(cached_pretraining(self.config, self.progress)) if init == PRETRAINED_INIT else init

    def export_models(self, outcome: GroupOutcome) -> None:
        """Each finished lane's final model in the converter's format (`models/<lane>`), so it can be
        used by `pfq.predict` or exported to PyTorch with `tools/convert_weights.py --to-torch`."""
        from pfq.convert.store import save_model_dir

        for li, lane in enumerate(outcome.lanes):
            if outcome.diverged_step[li] >= 0:
                continue
            variables = jax.tree.map(
                lambda x, li=li: to_host(x)[li],
                {"params": outcome.state["params"], "batch_stats": outcome.state["batch_stats"]},
            )
            save_model_dir(
                self.workdir / "models" / lane.name,
                self.spec,
                variables,
                {
                    "source_format": "pfq-finetuned",
                    "task": self.task.name,
                    **lane.as_row(),
                    "preprocess": PreprocessConfig.from_config(self.config.data).key(),
                },
                overwrite=True,
            )

    def run(self) -> list[dict]:
        cfg = self.config
        if workdir_lib.inspect(self.workdir, cfg.to_json(), self.overwrite):
            log.info("%s already holds this run's finished results; pass --overwrite to run it again", self.workdir)
            if is_writer():
                workdir_lib.remove_stale_temporaries(self.workdir)  # of a report interrupted last time
            return self._finished_rows()
        fit.refuse_what_does_not_fit(cfg, self.spec)  # before any data is loaded or the workdir touched
        data = load_study_data(cfg, self.task, progress=self.progress)
        lanes = lanes_lib.make_lanes(
            cfg.sweep.finetune_hq_ratios, cfg.sweep.inits, cfg.sweep.train_sizes, cfg.sweep.seeds
        )
        plan = self.preflight(lanes, data)
        data_print = fingerprint.data_fingerprint(data, cfg.data)
        if not self.overwrite:  # a resume must see the data its run started on
            fingerprint.check(self.workdir, data_print)
        # Only now, with the inputs known to be usable, is the workdir created, checked or (with
        # --overwrite) cleared; a failure above leaves earlier outputs untouched. The writer holds the
        # workdir's lock from here on, so a second run there stops instead of mixing with this one.
        with workdir_lib.exclusive(self.workdir) if is_writer() else contextlib.nullcontext():
            if workdir_lib.prepare(self.workdir, cfg.to_json(), self.overwrite, write=is_writer()):
                log.info("%s was finished by another run meanwhile", self.workdir)
                return self._finished_rows()
            if is_writer():
                fingerprint.record(self.workdir, data_print)
            return self._sweep(lanes, data, plan)

    def _finished_rows(self) -> list[dict]:
        return read_results(self.workdir / "results.csv")

    def _sweep(self, lanes: list, data: StudyData, plan: evaluate.ScoringPlan) -> list[dict]:
        cfg = self.config
        groups = lanes_lib.group_lanes(lanes, int(cfg.sweep.lanes_per_group))
        log.info(
            "%d lanes in %d group(s); train pool %d, test pool %d",
            len(lanes),
            len(groups),
            len(data.train_pool),
            len(data.test_pool),
        )
        rows, prediction_rows, diverged = [], [], []
        for gi, group in enumerate(groups):
            outcome = self.train_group(gi, group, data)
            diverged += [
                f"{lane.name} at step {int(outcome.diverged_step[li])} "
                f"({DIVERGED_REASONS[int(outcome.diverged_reason[li])]})"
                for li, lane in enumerate(group)
                if outcome.diverged_step[li] >= 0
            ]
            probs = self.predict_pool(outcome, data)
            if cfg.export_models and is_writer():
                self.export_models(outcome)
            rows += evaluate.lane_rows(
                group, outcome.lane_sets, lane_status(outcome), probs, data, plan, self.task.name
            )
            prediction_rows += evaluate.prediction_rows(group, probs, data)
        if len(diverged) == len(lanes):
            raise SweepDivergedError(
                f"every lane diverged: {'; '.join(diverged)}. Their state is saved in {self.workdir / 'checkpoints'}; "
                "no results were written. Lower config.optim.lr or check the data, then rerun with --overwrite"
            )
        if cfg.sweep.baseline:
            reference = baseline_lanes(lanes)
            sets = [lane_training_set(lane, data, self.task.num_classes) for lane in reference]
            status, probs = baseline_probs(sets, data, self.task.num_classes)
            rows += evaluate.lane_rows(reference, sets, status, probs, data, plan, self.task.name)
            prediction_rows += evaluate.prediction_rows(reference, probs, data)
        if not is_writer():
            return rows
        write_csv(self.workdir / "predictions.csv", prediction_rows)
        write_csv(self.workdir / "results.csv", rows)
        atomic_write_text(
            self.workdir / "run.json",
            json.dumps(
                {
                    "complete": True,
                    "compile_count": self.compile_count,
                    "lanes": len(lanes),
                    "lane_groups": len(groups),
                    # which grades split HQ/LQ (predictions.csv's `quality` holds each case's)
                    "quality_from": cfg.data.quality_from,
                    "quality_grading": data.grading.summary() if data.grading is not None else None,
                },
                indent=2,
            ),
        )
        return rows


def baseline_lanes(lanes: list[lanes_lib.Lane]) -> list[lanes_lib.Lane]:
    """One reference lane per (finetune ratio, train size, seed) of the sweep, init `BASELINE_INIT`."""
    cells = dict.fromkeys((lane.finetune_hq_ratio, lane.train_size, lane.seed) for lane in lanes)
    return [
        lanes_lib.Lane(-1 - i, ratio, baseline.BASELINE_INIT, size, seed) for i, (ratio, size, seed) in enumerate(cells)
    ]


def baseline_probs(sets: list[np.ndarray], data: StudyData, num_classes: int) -> tuple[list[str], np.ndarray]:
    """Per finetuning set (manifest indices): the reference's status ('ok' or why it was not fitted) and
    (lanes, test pool, classes) class probabilities for the test pool (NaN where not fitted)."""
    features = baseline.pool_features(data.source, np.unique(np.concatenate([*sets, data.test_pool])))
    case_ids = data.case_ids
    status = [baseline.fit_status(features, s, data.test_pool, case_ids) for s in sets]
    probs = np.full((len(sets), len(data.test_pool), num_classes), np.nan, np.float32)
    for li, s in enumerate(sets):
        if status[li] == "ok":
            probs[li] = baseline.fit_predict(features, data.labels, s, data.test_pool, num_classes)
    return status, probs


def lane_status(outcome: GroupOutcome) -> list[str]:
    """Per lane: 'ok', or when and why it diverged (the results' `status` column)."""
    return [
        "ok" if step < 0 else f"diverged at step {int(step)}: {DIVERGED_REASONS[int(reason)] or 'non-finite loss'}"
        for step, reason in zip(outcome.diverged_step, outcome.diverged_reason, strict=True)
    ]
