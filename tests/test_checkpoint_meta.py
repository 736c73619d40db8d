"""Damaged checkpoint metadata falls back to the previous checkpoint, as a damaged checkpoint does:
a tampered `data_iterator` state (garbage, a position of another step, a missing key) is reported,
moved aside, and the resume continues from the older checkpoint with the iterator at its position.
In process, on a tiny state and the real Grain iterator the trainer uses."""

from __future__ import annotations

import json
import logging

import grain
import numpy as np
import pytest

from pfq.data.pipeline import to_iterator
from pfq.train.checkpoint import GroupCheckpointer
from pfq.train.loop import adopt_iterator_state

TAMPERED = {
    "garbage state": "garbage",
    "a position of another step": {"next_index": 2},
    "no position": {},
    "a negative position": {"next_index": -5},
    "a string position": {"next_index": "4"},
    "a huge position": {"next_index": 10**30},
}


def _iterator():
    return to_iterator(grain.MapDataset.range(10).map(lambda i: np.int64(i)))


@pytest.mark.parametrize("name", list(TAMPERED))
def test_tampered_iterator_state_falls_back_to_the_previous_checkpoint(name, tmp_path, caplog):
    directory = tmp_path / "checkpoints" / "group0"
    ckpt = GroupCheckpointer(directory, keep=3, asynchronous=False)
    state = {"w": np.arange(3, dtype=np.float32)}
    for step in (2, 4):
        ckpt.save(step, {"w": state["w"] + step}, {"data_iterator": {"next_index": step}, "step": step})
    ckpt.wait()
    ckpt.close()
    meta_file = directory / "4" / "meta" / "metadata"
    meta_file.write_text(json.dumps({"data_iterator": TAMPERED[name], "step": 4}))

    iterator = _iterator()
    ckpt = GroupCheckpointer(directory, keep=3, asynchronous=False)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore(state, adopt_meta=lambda meta: adopt_iterator_state(iterator, meta))
    ckpt.close()
    assert restored is not None
    step, restored_state, _ = restored
    assert step == 2 and np.array_equal(restored_state["w"], state["w"] + 2)
    assert int(next(iterator)) == 2, "the iterator must sit at the restored checkpoint's position"
    assert any("group0/4" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert not (directory / "4").exists() and (tmp_path / "checkpoints" / "group0.unreadable").is_dir()


def test_an_intact_checkpoint_is_adopted(tmp_path):
    directory = tmp_path / "group0"
    ckpt = GroupCheckpointer(directory, keep=3, asynchronous=False)
    ckpt.save(4, {"w": np.ones(2, np.float32)}, {"data_iterator": {"next_index": 4}, "step": 4})
    ckpt.close()
    iterator = _iterator()
    ckpt = GroupCheckpointer(directory, keep=3, asynchronous=False)
    assert ckpt.restore({"w": np.zeros(2, np.float32)}, adopt_meta=lambda m: adopt_iterator_state(iterator, m))[0] == 4
    ckpt.close()
    assert int(next(iterator)) == 4
