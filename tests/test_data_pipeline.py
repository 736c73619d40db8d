"""The Grain lane pipeline: deterministic streams, restore, worker processes, per-host slices,
exact per-batch quality, class balancing and the optional geometric augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from pfq.data.pipeline import (
    AugmentConfig,
    LaneStream,
    augment,
    rotate_zoom,
    to_iterator,
    train_dataset,
)

N_CASES, SHAPE = 24, (4, 6, 6, 3)


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    volumes = rng.normal(size=(N_CASES,) + SHAPE).astype(np.float32)
    labels = np.arange(N_CASES) % 2
    is_hq = (np.arange(N_CASES) // 2) % 3 == 0  # 8 HQ of 24
    return volumes, labels, is_hq


def dataset(pool, lane_sets=None, seeds=(0, 1), steps=8, batch_size=4, **kwargs):
    source, labels, is_hq = pool
    lane_sets = lane_sets or [np.arange(0, 20), np.arange(4, 24)]
    return train_dataset(
        source,
        labels,
        lane_sets,
        list(seeds),
        batch_size=batch_size,
        num_steps=steps,
        augment_config=AugmentConfig(),
        is_hq=is_hq,
        **kwargs,
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_deterministic_and_lanes_independent(pool):
    a = take(to_iterator(dataset(pool)), 8)
    assert a[0]["image"].shape == (2, 4) + SHAPE and a[0]["label"].shape == (2, 4)
    assert_batches_equal(a, take(to_iterator(dataset(pool)), 8))
    alone = take(to_iterator(dataset(pool, [np.arange(4, 24)], seeds=(1,))), 8)
    for full, single in zip(a, alone, strict=True):  # lane 1's data does not depend on lane 0
        np.testing.assert_array_equal(full["image"][1], single["image"][0])


def test_iterator_state_restores_the_stream(pool):
    it = to_iterator(dataset(pool))
    take(it, 3)
    state = it.get_state()
    rest = take(it, 5)
    resumed = to_iterator(dataset(pool))
    resumed.set_state(state)
    assert_batches_equal(rest, take(resumed, 5))


def test_worker_processes_match_and_restore(pool):
    expected = take(to_iterator(dataset(pool)), 8)
    it = to_iterator(dataset(pool), workers=2)
    head = take(it, 3)
    state = it.get_state()
    assert_batches_equal(head + take(it, 5), expected)
    resumed = to_iterator(dataset(pool), workers=2)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected[3:])


def test_per_host_boxes_make_up_the_batch(pool):
    """Hosts holding half the lanes, or half of every lane's slots, load exactly those blocks."""
    full = take(to_iterator(dataset(pool)), 4)
    by_slots = [take(to_iterator(dataset(pool, box=(slice(None), slice(2 * i, 2 * i + 2)))), 4) for i in range(2)]
    by_lanes = [take(to_iterator(dataset(pool, box=(slice(i, i + 1), slice(None)))), 4) for i in range(2)]
    for s, batch in enumerate(full):
        assert by_slots[0][s]["image"].shape == (2, 2) + SHAPE and by_lanes[0][s]["image"].shape == (1, 4) + SHAPE
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([h[s][key] for h in by_slots], axis=1), batch[key])
            np.testing.assert_array_equal(np.concatenate([h[s][key] for h in by_lanes], axis=0), batch[key])
    with pytest.raises(ValueError, match="no contiguous block"):
        dataset(pool, box=(slice(0, 0), slice(None)))


@pytest.mark.parametrize("n_hq, n, batch_size", [(8, 24, 4), (5, 13, 3), (0, 10, 4), (10, 10, 4), (7, 20, 8)])
def test_exact_batch_quality(n_hq, n, batch_size):
    is_hq = np.zeros(n + 5, bool)
    lane_set = np.arange(5, n + 5)
    is_hq[lane_set[np.random.default_rng(1).permutation(n)[:n_hq]]] = True
    stream = LaneStream(lane_set, np.arange(n + 5) % 2, seed=3, batch_size=batch_size, is_hq=is_hq, exact_quality=True)
    share, total, seen_hq = batch_size * n_hq / n, 0, []
    for step in range(40):
        batch = stream.batch(step)
        assert np.all(np.isin(batch, lane_set))
        k = int(is_hq[batch].sum())
        assert np.floor(share) <= k <= np.ceil(share)
        total += k
        assert total == int(np.floor((step + 1) * share + 0.5))  # cumulatively exact
        seen_hq += [int(c) for c in batch if is_hq[c]]
    if n_hq:  # HQ cases come in epochs: every HQ case once before any repeats
        counts = np.bincount(seen_hq, minlength=n + 5)[is_hq]
        assert counts.max() - counts.min() <= 1


def test_inverse_frequency_balancing(pool):
    labels = np.array([0] * 18 + [1] * 6)
    stream = LaneStream(np.arange(24), labels, seed=0, batch_size=8, balance=True)
    drawn = np.concatenate([stream.batch(s) for s in range(150)])
    share = labels[drawn].mean()
    assert abs(share - 0.5) < 0.05  # without balancing it would be 0.25
    plain = np.concatenate([LaneStream(np.arange(24), labels, 0, 8).batch(s) for s in range(150)])
    assert abs(labels[plain].mean() - 0.25) < 0.01


def test_rotate_zoom():
    x = np.random.default_rng(0).normal(size=(3, 7, 7, 2)).astype(np.float32)
    np.testing.assert_allclose(rotate_zoom(x, 0.0, 1.0), x, atol=1e-6)
    turned = rotate_zoom(x, 90.0, 1.0)
    assert any(np.allclose(turned, np.rot90(x, k, axes=(1, 2)), atol=1e-5) for k in (1, -1))
    assert AugmentConfig().rotate_deg == 0 and AugmentConfig().zoom == 0  # off by default
    config = AugmentConfig(rotate_deg=10.0, zoom=0.1)
    a = augment(x, np.random.default_rng(5), config)
    np.testing.assert_array_equal(a, augment(x, np.random.default_rng(5), config))
    assert not np.array_equal(a, augment(x, np.random.default_rng(5), AugmentConfig()))
