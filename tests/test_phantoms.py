"""Tests of the synthetic phantom generator and the quality-degradation model.

The cohort tests use a 24x48x48 grid at the default spacing (same physics, ~2.5x cheaper than the
default 32x64x64) so that the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from pfq.data import degrade as dg
from pfq.data import phantom_set as ps
from pfq.data import phantoms as ph

COHORT_SHAPE = (24, 48, 48)
SPACING = (2.0, 1.0, 1.0)
N_PER_QUALITY = 120


# ----------------------------------------------------------------------------- helpers


def smooth(vol: np.ndarray, spacing, sigma_mm: float) -> np.ndarray:
    fz, fy, fx = dg.rfft_freqs(vol.shape, spacing)
    transfer = np.exp(-2 * np.pi**2 * sigma_mm**2 * (fz**2 + fy**2 + fx**2))
    return np.fft.irfftn(np.fft.rfftn(vol) * transfer, s=vol.shape, axes=(0, 1, 2))


def erode(mask: np.ndarray, steps=(1, 2, 2)) -> np.ndarray:
    out = mask.copy()
    for axis, n in enumerate(steps):
        for _ in range(n):
            out &= np.roll(out, 1, axis) & np.roll(out, -1, axis)
    return out


def min_gland_adc(case: ph.PhantomCase) -> float:
    """The sanity feature: minimum of the smoothed ADC inside the (eroded) gland."""
    return float(smooth(case.adc, case.spacing, 1.5)[erode(case.masks["gland"])].min())


def t2_cnr(case: ph.PhantomCase) -> float:
    """Gland-vs-surroundings T2w contrast over a robust (edge-insensitive) noise estimate in the gland."""
    gland = erode(case.masks["gland"])
    shell = erode(~case.masks["gland"], (0, 3, 3)) & ~erode(~case.masks["gland"], (0, 8, 8))
    residual = (case.t2w - smooth(case.t2w, case.spacing, 1.0))[gland]
    noise = 1.4826 * np.median(np.abs(residual - np.median(residual)))
    return abs(np.median(case.t2w[gland]) - np.median(case.t2w[shell])) / noise


@pytest.fixture(scope="module")
def cohort() -> dict[str, list[ph.PhantomCase]]:
    seeds = range(1000, 1000 + N_PER_QUALITY)  # the same patients at both qualities
    return {
        q: [ph.generate_case(i, quality=q, shape=COHORT_SHAPE, spacing=SPACING) for i in seeds] for q in ("hq", "lq")
    }


# ----------------------------------------------------------------------------- single cases


@pytest.mark.parametrize("quality", ["hq", "lq"])
def test_same_seed_is_bit_identical(quality):
    a = ph.generate_case(7, quality=quality, shape=COHORT_SHAPE)
    b = ph.generate_case(7, quality=quality, shape=COHORT_SHAPE)
    for ch in ph.CHANNELS:
        assert np.array_equal(getattr(a, ch), getattr(b, ch))
    assert (a.pirads, a.isup, a.severity, a.lesions) == (b.pirads, b.isup, b.severity, b.lesions)


def test_different_seeds_differ():
    a = ph.generate_case(1, quality="hq", shape=COHORT_SHAPE)
    b = ph.generate_case(2, quality="hq", shape=COHORT_SHAPE)
    for ch in ph.CHANNELS:
        assert not np.allclose(getattr(a, ch), getattr(b, ch))


def test_one_patient_two_qualities():
    hq = ph.generate_case(3, quality="hq", shape=COHORT_SHAPE)
    lq = ph.generate_case(3, quality="lq", shape=COHORT_SHAPE)
    assert hq.isup == lq.isup and [x.kind for x in hq.lesions] == [x.kind for x in lq.lesions]
    assert np.array_equal(hq.masks["gland"], lq.masks["gland"])
    assert 0.0 <= hq.severity <= 0.15 and 0.5 <= lq.severity <= 1.0
    assert not np.allclose(hq.t2w, lq.t2w)


def test_case_arrays_follow_the_interface():
    case = ph.generate_case(5, quality="lq", shape=(20, 40, 44), spacing=(2.5, 0.9, 1.1), severity=0.8)
    assert case.severity == 0.8 and case.quality == "lq" and case.spacing == (2.5, 0.9, 1.1)
    for ch in ph.CHANNELS:
        arr = getattr(case, ch)
        assert arr.shape == (20, 40, 44) and arr.dtype == np.float32 and np.isfinite(arr).all()
        assert (arr >= 0).all()
    assert case.adc.max() <= 3000.0
    with pytest.raises(ValueError):
        ph.generate_case(5, quality="medium")


def test_tiny_grids_do_not_fail():
    for shape in [(1, 4, 4), (4, 8, 8)]:
        case = ph.generate_case(0, quality="lq", shape=shape)
        assert case.t2w.shape == shape and 2 <= case.pirads <= 5


def test_reader_rule():
    assert ph.pirads_from_contrast(0.1, 20) == 2
    assert ph.pirads_from_contrast(0.2, 20) == 3
    assert ph.pirads_from_contrast(0.35, 10) == 4
    assert ph.pirads_from_contrast(0.35, 15) == 5
    assert ph.reader_flip_probability(0.0) == pytest.approx(0.10)
    assert ph.reader_flip_probability(0.7) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- cohort properties


def test_label_ranges_and_prevalence(cohort):
    for quality, cases in cohort.items():
        pirads = np.array([c.pirads for c in cases])
        isup = np.array([c.isup for c in cases])
        assert pirads.min() >= 2 and pirads.max() <= 5 and set(pirads) == {2, 3, 4, 5}
        assert isup.min() >= 0 and isup.max() <= 5 and len(set(isup)) >= 5
        assert 0.30 <= (pirads >= 4).mean() <= 0.60, quality
        # PI-RADS follows the latent grade: csPCa cases are mostly PI-RADS >= 4, the others mostly not.
        assert (pirads[isup >= 2] >= 4).mean() > (pirads[isup < 2] >= 4).mean() + 0.3


def test_cohort_has_mimics_and_multifocal_cases(cohort):
    cases = cohort["hq"]
    kinds = [{les.kind for les in c.lesions} for c in cases]
    assert sum("prostatitis" in k for k in kinds) > 0.2 * len(cases)
    assert sum("bph_nodule" in k for k in kinds) > 0.2 * len(cases)
    n_lesions = [sum(les.kind in ("tumour", "benign") for les in c.lesions) for c in cases]
    assert sum(n >= 2 for n in n_lesions) > 0.05 * len(cases)
    # Mimics alone never make a case positive before reader noise.
    mimics = [les for c in cases for les in c.lesions if les.kind in ("prostatitis", "bph_nodule")]
    assert all(les.pirads == 2 for les in mimics)


def test_lq_images_are_worse(cohort):
    hq = np.array([t2_cnr(c) for c in cohort["hq"]])
    lq = np.array([t2_cnr(c) for c in cohort["lq"]])  # the same patients (cohort seeds are paired)
    assert (hq > lq).mean() > 0.9 and np.median(hq) > 1.4 * np.median(lq)
    # Paired: the same patient correlates less with its pristine scan when scanned at LQ.
    for seed in range(5):
        ref = ph.generate_case(seed, quality="hq", shape=COHORT_SHAPE, severity=0.0)
        hq_case = ph.generate_case(seed, quality="hq", shape=COHORT_SHAPE)
        lq_case = ph.generate_case(seed, quality="lq", shape=COHORT_SHAPE)
        for ch in ph.CHANNELS:
            r_hq = np.corrcoef(getattr(ref, ch).ravel(), getattr(hq_case, ch).ravel())[0, 1]
            r_lq = np.corrcoef(getattr(ref, ch).ravel(), getattr(lq_case, ch).ravel())[0, 1]
            assert r_hq > r_lq, (seed, ch)


def test_simple_feature_separates_hq_better_than_lq(cohort):
    aucs = {}
    for quality, cases in cohort.items():
        x = np.array([[min_gland_adc(c) / 1000.0] for c in cases])
        y = np.array([c.pirads >= 4 for c in cases])
        prob = cross_val_predict(LogisticRegression(), x, y, cv=5, method="predict_proba")[:, 1]
        aucs[quality] = roc_auc_score(y, prob)
    assert aucs["hq"] > 0.78, aucs
    assert aucs["hq"] > aucs["lq"] + 0.1, aucs


# ----------------------------------------------------------------------------- files on disk


def read_manifest(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_phantom_set_files(tmp_path):
    shape, spacing = (12, 20, 24), (2.5, 1.25, 1.0)
    manifest = ps.write_phantom_set(tmp_path / "set", 5, seed=3, shape=shape, spacing=spacing, progress=False)
    assert manifest == tmp_path / "set" / "manifest.csv"
    columns, rows = read_manifest(manifest)
    assert tuple(columns) == ph.MANIFEST_COLUMNS and len(rows) == 5
    assert sum(r["quality"] == "hq" for r in rows) == round(0.5 * 5)
    for i, row in enumerate(rows):
        case = ph.generate_case(ps.case_seed(3, i), quality=row["quality"], shape=shape, spacing=spacing)
        assert (int(row["pirads"]), int(row["isup"])) == (case.pirads, case.isup)
        for ch in ph.CHANNELS:
            assert row[ch] == f"images/{row['case_id']}_{ch}.nii.gz"
            img = nib.load(manifest.parent / row[ch])
            assert img.shape == shape[::-1]
            assert np.allclose(img.affine, np.diag([1.0, 1.25, 2.5, 1.0]))
            assert np.allclose(nib.as_closest_canonical(img).affine, img.affine)
            stored, original = np.asarray(img.dataobj).transpose(2, 1, 0), getattr(case, ch)
            assert np.abs(stored - original).max() <= 1.01 * img.dataobj.slope  # int16 + slope
            assert np.array_equal(stored == 0, original == 0)  # zeros survive for non-zero normalisation
    record = json.loads((manifest.parent / "phantoms.json").read_text())
    assert record["params"]["n_cases"] == 5 and len(record["cases"]) == 5
    assert not list(manifest.parent.rglob(".*tmp*"))  # no temporary files left behind


def test_phantom_set_is_reused_and_grows_stably(tmp_path):
    kw = dict(seed=1, shape=(8, 16, 16), progress=False)
    manifest = ps.write_phantom_set(tmp_path, 6, **kw)
    stamp = manifest.stat().st_mtime_ns
    first = {r["case_id"]: r for r in read_manifest(manifest)[1]}
    assert ps.write_phantom_set(tmp_path, 6, **kw).stat().st_mtime_ns == stamp  # reused, not rewritten

    bigger = ps.write_phantom_set(tmp_path / "more", 9, **kw)
    rows = {r["case_id"]: r for r in read_manifest(bigger)[1]}
    assert sum(r["quality"] == "hq" for r in rows.values()) == round(0.5 * 9)
    same = [cid for cid, r in first.items() if rows[cid]["quality"] == r["quality"]]
    assert len(same) >= 3
    for cid in same:
        a = np.asarray(nib.load(manifest.parent / first[cid]["adc"]).dataobj)
        b = np.asarray(nib.load(bigger.parent / rows[cid]["adc"]).dataobj)
        assert np.array_equal(a, b) and first[cid]["pirads"] == rows[cid]["pirads"]


def test_concurrent_writers_of_one_set_do_not_collide(tmp_path):
    """The hosts of a multi-host run generate the same set into a shared cache at once; each
    writer's temporary files are its own, so both finish with the same files."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    kw = dict(seed=2, shape=(16, 48, 48), progress=False)
    with ctx.Pool(3) as pool:  # in step: the same work, case by case (with shared temporary names 4 of 5 runs failed)
        manifests = pool.starmap(_write_set, [(str(tmp_path / "shared"), kw)] * 3)
    assert len(set(manifests)) == 1
    reference = ps.write_phantom_set(tmp_path / "alone", 24, **kw)
    for row in read_manifest(reference)[1]:
        for ch in ph.CHANNELS:
            assert (tmp_path / "shared" / row[ch]).read_bytes() == (tmp_path / "alone" / row[ch]).read_bytes()
    assert not list((tmp_path / "shared").rglob(".*tmp*"))


def _write_set(out: str, kw: dict) -> str:
    return str(ps.write_phantom_set(out, 24, **kw))


def test_changed_parameters_regenerate(tmp_path):
    manifest = ps.write_phantom_set(tmp_path, 2, seed=0, shape=(8, 16, 16), progress=False)
    before = np.asarray(nib.load(tmp_path / read_manifest(manifest)[1][0]["t2w"]).dataobj)
    ps.write_phantom_set(tmp_path, 2, seed=1, shape=(8, 16, 16), progress=False)
    after = np.asarray(nib.load(tmp_path / read_manifest(manifest)[1][0]["t2w"]).dataobj)
    assert json.loads((tmp_path / "phantoms.json").read_text())["params"]["seed"] == 1
    assert not np.array_equal(before, after)


def test_quality_assignment_is_exact():
    for n, f in [(10, 0.5), (7, 0.3), (5, 0.0), (5, 1.0), (9, 0.5)]:
        q = ps.assign_qualities(n, f, seed=4)
        assert q.count("hq") == round(f * n) and len(q) == n
    assert ps.assign_qualities(50, 0.5, 0) != ps.assign_qualities(50, 0.5, 1)


def test_synth_main(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path / "s"),
        "--cases",
        "3",
        "--seed",
        "2",
        "--shape",
        "8",
        "16",
        "16",
        "--spacing",
        "2",
        "1",
        "1",
        "--hq-fraction",
        "0.34",
        "--no-progress",
    ]
    assert ps.synth_main(argv) == 0
    _, rows = read_manifest(tmp_path / "s" / "manifest.csv")
    assert len(rows) == 3 and sum(r["quality"] == "hq" for r in rows) == 1
    assert "3 cases" in capsys.readouterr().out


# ----------------------------------------------------------------------------- degradation model


def test_degradation_is_deterministic_and_grows_with_severity():
    rng = np.random.default_rng(0)
    vol = (1.0 + smooth(rng.standard_normal((16, 32, 32)), SPACING, 3.0)).astype(np.float32)
    a = dg.degrade_t2w(vol, 0.7, np.random.default_rng(1), SPACING)
    b = dg.degrade_t2w(vol, 0.7, np.random.default_rng(1), SPACING)
    assert np.array_equal(a, b)
    degraded = [dg.degrade_t2w(vol, s, np.random.default_rng(1), SPACING) for s in (0.0, 0.5, 1.0)]
    errors = [np.abs(d - vol).mean() for d in degraded]
    assert errors[0] < errors[1] < errors[2]


def test_zero_severity_artefacts_are_identities():
    rng = np.random.default_rng(0)
    vol = rng.random((8, 16, 16), dtype=np.float32)
    spec, _ = dg.splice_motion(vol, SPACING, 0.0, rng)
    assert np.allclose(spec, np.fft.rfftn(vol), atol=1e-4)
    assert np.all(dg.legendre_bias_field(vol.shape, 0.0, rng) == 1.0)
    assert np.allclose(dg.resolution_transfer(vol.shape, SPACING, 0.0, 0.0), 1.0)
    assert np.allclose(dg.apply_ap_shift(vol, np.zeros_like(vol)), vol)
    assert np.all(dg.ghost_line_gain(16, 4, 0, 0.0) == 1.0)
    assert np.allclose(dg.rician_noise(vol, 0.0, rng), vol)


def test_ghosting_keeps_the_kspace_centre():
    gain = dg.ghost_line_gain(64, 4, 0, 0.7)
    assert gain[0] == 1.0 and gain[1] == 1.0 and (gain < 1).sum() >= 64 // 4 - 2


def test_ap_shift_moves_along_h_only():
    vol = np.zeros((4, 20, 6), dtype=np.float32)
    vol[:, 8, :] = 1.0
    out = dg.apply_ap_shift(vol, np.full(vol.shape, 3.0, dtype=np.float32), pile_up=False)
    assert np.allclose(out[:, 11, :], 1.0) and np.isclose(out.sum(), vol.sum())


def test_dwi_distortion_is_shared_by_b_values():
    rng = np.random.default_rng(0)
    vol = rng.random((8, 16, 16), dtype=np.float32) + 1.0
    dwi = dg.degrade_dwi([vol, 0.3 * vol], 0.8, np.random.default_rng(2), SPACING)
    assert len(dwi.images) == 2 and dwi.shift_mm.shape == vol.shape and np.abs(dwi.shift_mm).max() > 0
    # Shared artefacts cancel in the noise-free ADC (up to the small drift between b-values).
    adc = dg.compute_adc(*dwi.noiseless, 50.0, 1400.0)
    expected = np.log(1 / 0.3) / 1350e-6
    assert abs(np.median(adc) - expected) < 0.1 * expected


@settings(max_examples=30, deadline=None)
@given(st.floats(0, 3000), st.floats(0.05, 5.0))
def test_compute_adc_recovers_noise_free_values(adc, s0):
    low = np.array([s0 * np.exp(-50e-6 * adc)], dtype=np.float32)
    high = np.array([s0 * np.exp(-1400e-6 * adc)], dtype=np.float32)
    out = dg.compute_adc(low, high, 50.0, 1400.0)
    assert 0.0 <= out[0] <= 3000.0 and abs(out[0] - adc) < 1.0


@pytest.mark.parametrize("quality", ["hq", "lq"])
def test_severity_ranges(quality):
    rng = np.random.default_rng(0)
    lo, hi = dg.SEVERITY_RANGES[quality]
    draws = [dg.sample_severity(quality, rng) for _ in range(200)]
    assert lo <= min(draws) and max(draws) <= hi


def test_lesion_scale_enlarges_only_the_lesions():
    def generate(seed, scale):
        case = ph.generate_case(seed, quality="hq", shape=(24, 48, 48), spacing=(2.0, 1.0, 1.0), lesion_scale=scale)
        return [les.diameter_mm for les in case.lesions if les.kind == "tumour"], case

    seed = next(s for s in range(100) if generate(s, 1.0)[0])
    small, base = generate(seed, 1.0)
    large, scaled = generate(seed, 1.5)
    assert len(small) == len(large) >= 1
    for a, b in zip(small, large, strict=True):
        assert 1.2 < b / a < 1.8  # the mask-based diameter follows the scale, up to voxelisation
    # Anatomy comes from the same patient stream: the gland is unchanged.
    np.testing.assert_array_equal(base.masks["gland"], scaled.masks["gland"])
