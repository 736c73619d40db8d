"""Image-quality metrics: MRIQC's formulas, scale invariance, and each measure against the phantom
degradation it is meant to detect (per-artefact severities), on tiny volumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pfq.data import degrade as dg
from pfq.data import iqm
from pfq.data import phantoms as ph

ROOT = Path(__file__).resolve().parents[1]
SHAPE, SPACING = (16, 32, 32), (4.0, 2.0, 2.0)  # the default study's phantom grid
ANATOMIES = (11, 12, 13)
BASE = 0.05  # every other artefact at an HQ level


def _reference_module():
    spec = importlib.util.spec_from_file_location("mriqc_reference", ROOT / "tools" / "mriqc_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_efc_and_tail_match_mriqc_golden_values():
    ref = _reference_module()
    golden = json.loads((ROOT / "tests" / "data" / "mriqc_golden.json").read_text())
    vol = ref.reference_volume()
    frame = ref.frame_mask(vol).astype(bool)
    valid = iqm.valid_region(vol)
    np.testing.assert_array_equal(valid, ~frame)  # pfq's valid region is MRIQC's non-frame here
    assert iqm.efc(vol, ~valid) == pytest.approx(golden["efc_framemask"], rel=1e-12)
    assert iqm.efc(vol) == pytest.approx(golden["efc_no_framemask"], rel=1e-12)
    fg = iqm.foreground(vol, valid)
    assert float(np.median(vol[fg])) == pytest.approx(golden["foreground_median"], rel=1e-12)
    # tail is MRIQC's wm2max inverted, with the foreground median as the tissue level
    assert iqm.tail(vol, valid, fg) == pytest.approx(1.0 / golden["wm2max_median_foreground"], rel=1e-12)


def _case(seed: int, severity) -> dict[str, float]:
    c = ph.generate_case(seed, quality="hq", shape=SHAPE, spacing=SPACING, severity=severity, lesion_scale=1.6)
    return iqm.array_iqms(c.t2w, c.highb, c.adc, c.spacing)


def test_every_measure_is_invariant_to_intensity_scale():
    c = ph.generate_case(3, quality="lq", shape=SHAPE, spacing=SPACING, lesion_scale=1.6)
    a = iqm.array_iqms(c.t2w, c.highb, c.adc, c.spacing)
    b = iqm.array_iqms(c.t2w * 3, c.highb * 3, c.adc * 3, c.spacing)
    assert list(a) == iqm.iqm_names() + list(iqm.HEADER_NAMES)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, nan_ok=True), k  # float32 rounding of x3 only


def test_zero_padding_is_outside_the_valid_region():
    c = ph.generate_case(4, quality="lq", shape=SHAPE, spacing=SPACING, lesion_scale=1.6)
    pad = ((2, 2), (4, 4), (2, 2))  # even: the Haar blocks of the noise estimate stay aligned
    a = iqm.array_iqms(c.t2w, c.highb, c.adc, c.spacing)
    b = iqm.array_iqms(*(np.pad(x, pad) for x in (c.t2w, c.highb, c.adc)), c.spacing)
    # measures over V or F only (the autocorrelation lags depend on the grid's size)
    for k in (
        "t2w_snr",
        "highb_snr",
        "adc_snr",
        "t2w_efc",
        "highb_efc",
        "adc_efc",
        "t2w_tail",
        "highb_tail",
        "adc_clip_frac",
        "highb_floor_frac",
    ):
        assert b[k] == pytest.approx(a[k], rel=1e-6), k


# (artefact, measure, direction): each measure moves monotonically with its own artefact.
TARGETS = [
    ("noise", "t2w_snr", -1),
    ("noise", "highb_snr", -1),
    ("noise", "adc_snr", -1),
    ("noise", "highb_floor_frac", 1),
    ("noise", "adc_clip_frac", 1),
    ("ghost", "t2w_ghost", 1),
    ("ghost", "highb_ghost", 1),
    ("blur", "highb_fwhm_inplane", 1),
    ("blur", "adc_fwhm_inplane", 1),
    ("bias", "highb_inu", 1),
    ("bias", "t2w_tail", 1),
]
# Weaker on these tiny phantoms: monotonic in the median over anatomies, and severe below clean in each.
WEAK_TARGETS = [("ghost", "adc_ghost", 1), ("distortion", "t2_adc_ngf", -1)]
# (measure, artefact): the same measure barely moves with this other artefact (< 25% of its own effect).
INSENSITIVE = [
    ("t2w_ghost", "noise"),
    ("highb_snr", "motion"),
    ("adc_fwhm_inplane", "bias"),
    ("t2w_tail", "blur"),
    ("highb_floor_frac", "motion"),
    ("adc_clip_frac", "motion"),
    ("highb_inu", "blur"),
    ("t2w_snr", "distortion"),
]
LEVELS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def sweeps() -> dict:
    """IQMs of 3 anatomies x 6 artefacts x 3 severities (the rest at BASE): 54 tiny cases, seconds."""
    out = {}
    for art in dg.ARTEFACTS:
        for seed in ANATOMIES:
            for s in LEVELS:
                out[art, seed, s] = _case(seed, {**{a: BASE for a in dg.ARTEFACTS}, art: s})
    return out


def _change(sweeps: dict, art: str, name: str) -> float:
    return float(np.median([sweeps[art, seed, 1.0][name] - sweeps[art, seed, 0.0][name] for seed in ANATOMIES]))


@pytest.mark.parametrize("art,name,direction", TARGETS)
def test_measure_is_monotonic_in_its_own_artefact(sweeps, art, name, direction):
    for seed in ANATOMIES:
        values = [direction * sweeps[art, seed, s][name] for s in LEVELS]
        assert values[0] < values[1] < values[2], (seed, values)


@pytest.mark.parametrize("art,name,direction", WEAK_TARGETS)
def test_weaker_measures_follow_their_artefact(sweeps, art, name, direction):
    for seed in ANATOMIES:
        assert direction * sweeps[art, seed, 0.0][name] < direction * sweeps[art, seed, 1.0][name], seed
    medians = [direction * np.median([sweeps[art, seed, s][name] for seed in ANATOMIES]) for s in LEVELS]
    assert medians[0] < medians[1] < medians[2], medians


@pytest.mark.parametrize("name,other", INSENSITIVE)
def test_measure_is_insensitive_to_other_artefacts(sweeps, name, other):
    own = next(a for a, n, _ in TARGETS if n == name)
    assert abs(_change(sweeps, other, name)) < 0.25 * abs(_change(sweeps, own, name))


def test_header_checks_follow_the_pirads_minima():
    ok = iqm.header_checks({"t2w": np.array([3.0, 0.6, 0.4]), "highb": np.array([4.0, 2.0, 2.0])})
    assert ok["t2w_pirads_ok"] == 1.0 and ok["dwi_pirads_ok"] == 1.0
    thick = iqm.header_checks({"t2w": np.array([3.6, 0.6, 0.4]), "highb": np.array([5.0, 2.0, 2.0])})
    assert thick["t2w_pirads_ok"] == 0.0 and thick["dwi_pirads_ok"] == 0.0
    coarse = iqm.header_checks({"t2w": np.array([3.0, 0.8, 0.4]), "highb": np.array([4.0, 2.6, 2.0])})
    assert coarse["t2w_pirads_ok"] == 0.0 and coarse["dwi_pirads_ok"] == 0.0
    assert coarse["t2w_inplane_mm"] == pytest.approx(0.8)


def test_one_severity_equals_every_artefact_at_it():
    kw = dict(quality="lq", shape=SHAPE, spacing=SPACING, lesion_scale=1.6)
    one = ph.generate_case(21, severity=0.7, **kw)
    each = ph.generate_case(21, severity=dg.Severity.uniform(0.7), **kw)
    mapping = ph.generate_case(21, severity={a: 0.7 for a in dg.ARTEFACTS}, **kw)
    for ch in ph.CHANNELS:
        np.testing.assert_array_equal(getattr(one, ch), getattr(each, ch))
        np.testing.assert_array_equal(getattr(one, ch), getattr(mapping, ch))
    assert one.pirads == each.pirads and one.severities == {a: 0.7 for a in dg.ARTEFACTS}
    # Severities are per artefact: turning one off changes the image, not the worst-artefact severity.
    quiet = ph.generate_case(21, severity={**{a: 0.7 for a in dg.ARTEFACTS}, "noise": 0.0}, **kw)
    assert quiet.severity == 0.7 and not np.array_equal(quiet.t2w, one.t2w)
    with pytest.raises(ValueError, match="unknown artefact"):
        dg.as_severity({"wobble": 1.0})
