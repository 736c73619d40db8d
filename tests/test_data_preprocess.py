"""NIfTI loading and preprocessing against independent expectations: orientations, dtypes and
scalings written byte for byte, grids that need resampling, normalisation and crop/pad."""

from __future__ import annotations

import numpy as np
import pytest
from niftigen import ras_affine, smooth_volume, to_storage, write_case, write_manifest, write_nifti

from pfq.data.manifest import read_manifest
from pfq.data.preprocess import (
    CaseError,
    PreprocessConfig,
    VolumeError,
    aligned_channels,
    crop_or_pad,
    grid_problems,
    load_case,
    load_nifti,
    read_case,
    read_volume,
    znormalise,
)

SHAPE = (12, 10, 6)


def rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


@pytest.mark.parametrize(
    "perm, flips, oblique",
    [
        ((0, 1, 2), (False, False, False), 0.0),  # RAS
        ((0, 1, 2), (True, True, False), 0.0),  # LPS, the DICOM convention
        ((0, 1, 2), (False, False, True), 0.0),  # slices stored head to foot
        ((2, 0, 1), (True, False, True), 0.0),  # permuted and flipped axes
        ((1, 0, 2), (False, True, False), 10.0),  # permuted, flipped, 10 degrees oblique
    ],
)
def test_orientations_load_as_ras_then_dhw(tmp_path, perm, flips, oblique):
    ras = smooth_volume(SHAPE, 1)
    stored, affine = to_storage(ras, ras_affine(), perm, flips)
    write_nifti(tmp_path / "v.nii.gz", stored, rotation_z(oblique) @ affine)
    array, canonical = load_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(array, ras.transpose(2, 1, 0))  # (D, H, W) = (k, j, i)
    np.testing.assert_allclose(canonical, rotation_z(oblique) @ ras_affine(), atol=1e-4)


@pytest.mark.parametrize(
    "dtype, slope, inter, big_endian",
    [
        (np.int16, 2.5, -10.0, True),  # big-endian int16 with scl_slope/inter
        (np.int16, 0.5, None, False),
        (np.uint8, None, None, False),
        (np.float64, None, None, True),
        (np.float32, 2.0, 1.0, False),
    ],
)
def test_dtypes_and_scaling(tmp_path, dtype, slope, inter, big_endian):
    raw = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 200 + 1).astype(dtype)
    write_nifti(tmp_path / "v.nii", raw, ras_affine(), dtype=dtype, slope=slope, inter=inter, big_endian=big_endian)
    array, _ = load_nifti(tmp_path / "v.nii")
    expected = raw.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if inter is None else inter)
    assert array.dtype == np.float32
    np.testing.assert_allclose(array, expected.transpose(2, 1, 0), rtol=1e-6)


def test_trailing_singleton_dimension_is_3d(tmp_path):
    write_nifti(tmp_path / "v.nii", smooth_volume(SHAPE + (1,)), ras_affine())
    assert load_nifti(tmp_path / "v.nii")[0].shape == SHAPE[::-1]


def linear_image(shape, affine) -> np.ndarray:
    """Voxel values linear in world coordinates: trilinear resampling reproduces them exactly."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (world @ np.array([0.3, -0.2, 0.1]) + 100.0).reshape(shape).astype(np.float32)


def case_with(tmp_path, volumes: dict[str, tuple[np.ndarray, np.ndarray]], **kwargs):
    cells = {}
    for role, (data, affine) in volumes.items():
        write_nifti(tmp_path / f"{role}.nii.gz", data, affine, **kwargs.get(role, {}))
        cells[role] = f"{role}.nii.gz"
    manifest = write_manifest(tmp_path / "m.csv", [{"case_id": "a", **cells, "quality": "hq"}])
    return read_manifest(manifest).cases[0]


def test_adc_at_half_resolution_is_resampled_onto_t2w(tmp_path):
    """T2w stored LPS at 0.5 x 0.6 mm in-plane; ADC stored RAS at 1.0 x 1.2 mm covering the same field."""
    t2w_ras_affine = ras_affine((0.5, 0.6, 3.0))
    t2w = linear_image(SHAPE, t2w_ras_affine)
    t2w_stored, t2w_affine = to_storage(t2w, t2w_ras_affine, (0, 1, 2), (True, True, False))
    adc_shape = (SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2])
    adc_affine = ras_affine((1.0, 1.2, 3.0), origin=np.array((-10.0, 5.0, 20.0)) + (0.25, 0.3, 0.0))
    case = case_with(
        tmp_path,
        {
            "t2w": (t2w_stored, t2w_affine),
            "highb": (t2w_stored, t2w_affine),
            "adc": (linear_image(adc_shape, adc_affine), adc_affine),
        },
    )
    volumes = read_case(case)
    assert grid_problems(case, volumes) == []
    t2w_c, highb_c, adc_c = aligned_channels(volumes, None)
    np.testing.assert_array_equal(t2w_c, t2w.transpose(2, 1, 0))  # same grid: exact, no interpolation
    np.testing.assert_array_equal(highb_c, t2w_c)
    # Inside the ADC samples' hull (T2w i in [1, 10], j in [1, 8]) the linear field is reproduced.
    np.testing.assert_allclose(adc_c[:, 1:9, 1:11], t2w_c[:, 1:9, 1:11], rtol=1e-5)


def test_target_spacing_resamples_every_channel(tmp_path):
    affine = ras_affine((0.5, 0.5, 3.0))
    data = linear_image(SHAPE, affine)
    case = case_with(tmp_path, {r: (data, affine) for r in ("t2w", "highb", "adc")})
    channels = aligned_channels(read_case(case), (1.0, 0.5, 0.5))
    assert channels[0].shape == (18, 10, 12)  # D: 6 slices x 3 mm -> 18 x 1 mm
    expected_affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1 / 3, -1 / 3], [0, 0, 0, 1]])
    expected = linear_image((12, 10, 18), expected_affine).transpose(2, 1, 0)
    np.testing.assert_allclose(channels[0][1:-1], expected[1:-1], rtol=1e-5)  # the outer slices extrapolate
    for c in channels[1:]:
        np.testing.assert_array_equal(c, channels[0])


def test_unoriented_channel_with_t2w_shape_counts_as_same_grid(tmp_path):
    data = smooth_volume(SHAPE)
    stored, affine = to_storage(data, ras_affine(), (0, 1, 2), (True, False, False))
    case = case_with(
        tmp_path,
        {"t2w": (stored, affine), "highb": (stored, affine), "adc": (stored, affine)},
        adc={"codes": (0, 0), "pixdim": (0.5, 0.6, 3.0)},
    )
    volumes = read_case(case)
    assert not volumes["adc"].oriented and grid_problems(case, volumes) == []
    channels = aligned_channels(volumes, None)
    np.testing.assert_array_equal(channels[2], channels[0])  # follows T2w's reorientation


def test_unoriented_channel_on_another_grid_is_refused(tmp_path):
    data = smooth_volume(SHAPE)
    case = case_with(
        tmp_path,
        {"t2w": (data, ras_affine()), "highb": (data, ras_affine()), "adc": (data[::2], ras_affine())},
        adc={"codes": (0, 0), "pixdim": (1.0, 0.6, 3.0)},
    )
    [problem] = grid_problems(case, read_case(case))
    assert problem.column == "adc" and "no usable affine" in problem.message and problem.file.endswith("adc.nii.gz")
    with pytest.raises(CaseError, match="cannot be resampled"):
        load_case(case, PreprocessConfig(input_size=(4, 8, 8)))


def test_znormalise_over_nonzero_voxels():
    x = np.zeros((4, 5, 6), np.float32)
    x[1:3, 1:4, 2:5] = np.random.default_rng(0).normal(7.0, 3.0, (2, 3, 3))
    z = znormalise(x)
    assert np.all(z[x == 0] == 0)
    assert abs(z[x != 0].mean()) < 1e-5 and abs(z[x != 0].std() - 1) < 1e-5


def test_crop_or_pad_centres():
    x = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    y = crop_or_pad(x, (3, 8, 7))
    assert y.shape == (3, 8, 7)
    np.testing.assert_array_equal(y[:, 1:7], x[1:4])
    assert not y[:, 0].any() and not y[:, 7].any()


@pytest.mark.parametrize("n, size", [(10, 5), (10, 4), (11, 5), (11, 4), (17, 16), (224, 223), (6, 6)])
def test_centre_crop_starts_where_monai_does(n, size):
    # MONAI's CenterSpatialCrop (upstream's): centre n // 2, start centre - size // 2. This differs from
    # (n - size) // 2 exactly when n is even and size odd.
    x = np.arange(n, dtype=np.float32)
    assert crop_or_pad(x, (size,))[0] == n // 2 - size // 2


def test_load_case_output(tmp_path):
    cells = write_case(tmp_path, "a", shape=SHAPE)
    case = read_manifest(write_manifest(tmp_path / "m.csv", [{**cells, "quality": "4"}])).cases[0]
    x = load_case(case, PreprocessConfig(input_size=(8, 12, 12)))
    assert x.shape == (8, 12, 12, 3) and x.dtype == np.float32 and np.isfinite(x).all()


def test_volume_error_names_file(tmp_path):
    with pytest.raises(VolumeError, match="file not found") as info:
        read_volume(tmp_path / "nope.nii.gz")
    assert info.value.file == tmp_path / "nope.nii.gz"


@pytest.mark.parametrize(
    "scale, offset, shape",
    [
        ((0.5, 0.5, 1 / 3), (-0.25, -0.25, -1 / 3), (20, 16, 15)),  # upsampling, edges blend to zero
        ((2.0, 1.0, 1.5), (0.5, 0.0, 0.25), (5, 10, 4)),  # downsampling
        ((-1.0, 0.7, 1.0), (11.0, -2.0, 3.5), (12, 18, 6)),  # a flip, partly outside the source
    ],
)
def test_separable_resampling_equals_the_general_path(scale, offset, shape):
    from pfq.data.preprocess import _resample_general, resample_separable

    data = smooth_volume(SHAPE, 4)
    expected = _resample_general(data, np.diag(scale), np.array(offset), shape)
    np.testing.assert_allclose(resample_separable(data, np.array(scale), np.array(offset), shape), expected, atol=1e-5)


def test_general_resampling_edges():
    from pfq.data.preprocess import _resample_general

    data = np.ones((4, 4, 4), np.float32)
    out = _resample_general(data, np.eye(3), np.array([-0.5, 0.0, 0.0]), (6, 4, 4))
    # Source coordinates -0.5 .. 4.5: within one voxel of the edge the edge value, beyond it zero.
    np.testing.assert_allclose(out[:, 0, 0], [1, 1, 1, 1, 1, 0])


def test_preprocessing_normalises_over_the_whole_volume_then_crops(tmp_path):
    cells = write_case(tmp_path, "a", shape=(20, 16, 6))
    case = read_manifest(write_manifest(tmp_path / "m.csv", [{**cells, "quality": "hq"}])).cases[0]
    config = PreprocessConfig(input_size=(8, 10, 12), spacing=(2.0, 0.6, 0.5))
    channels = aligned_channels(read_case(case), config.spacing)
    expected = np.stack([crop_or_pad(znormalise(c), config.input_size) for c in channels], -1)
    np.testing.assert_allclose(load_case(case, config), expected, atol=1e-5)


def _zero_background_case(folder, foreground, seed=0):
    """A case written by nibabel itself: an ellipsoid of tissue on an exactly zero background, on an
    oblique grid whose stored axes are permuted and flipped against RAS (so reorienting is not a
    diagonal map). Returns the case and the tissue values."""
    import nibabel as nib

    shape = (40, 36, 12)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    tissue = sum(a * a for a in axes) < 0.8
    values = foreground(np.random.default_rng(seed), shape)
    data = np.where(tissue, values, 0).astype(np.float32)
    t, u = np.deg2rad(20), 0.3
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(u), -np.sin(u)], [0, np.sin(u), np.cos(u)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = (rot @ np.diag([0.6, 0.6, 3.0]))[:, [1, 0, 2]] * [1, -1, 1]
    affine[:3, 3] = [-12.0, 7.0, 30.0]
    cells = {}
    for role in ("t2w", "highb", "adc"):
        nib.save(nib.Nifti1Image(data, affine), folder / f"{role}.nii.gz")
        cells[role] = f"{role}.nii.gz"
    case = read_manifest(write_manifest(folder / "m.csv", [{**cells, "quality": "hq"}])).cases[0]
    return case, data[tissue]


def test_target_spacing_the_image_already_has_resamples_nothing(tmp_path):
    # The header stores the spacing as float32 (0.6 reads back as 0.59999999 / 0.60000002): asking for
    # the image's own spacing must give exactly the native result, zero background included.
    case, _ = _zero_background_case(tmp_path, lambda rng, shape: rng.normal(300.0, 77.0, shape))
    volumes = read_case(case)
    own = tuple(float(s) for s in volumes["t2w"].spacing[::-1])
    assert own != (3.0, 0.6, 0.6)
    native = load_case(case, PreprocessConfig(input_size=(12, 36, 40)))
    np.testing.assert_array_equal(load_case(case, PreprocessConfig(input_size=(12, 36, 40), spacing=own)), native)
    np.testing.assert_array_equal(
        load_case(case, PreprocessConfig(input_size=(12, 36, 40), spacing=(3.0, 0.6, 0.6))), native
    )


def test_resampling_carries_the_zero_background(tmp_path):
    # Genuinely resampled (0.6 -> 0.45 mm in-plane, oblique): tissue of one value stays that value up
    # to its edge and the background stays exactly zero, so nothing between enters the non-zero
    # normalisation; textured tissue keeps its non-zero mean.
    case, _ = _zero_background_case(tmp_path, lambda rng, shape: np.full(shape, 100.0))
    [t2w, *_] = aligned_channels(read_case(case), (3.0, 0.45, 0.45))
    tissue = t2w[t2w != 0]
    np.testing.assert_allclose(tissue, 100.0, rtol=1e-5)
    expected_voxels = np.count_nonzero(read_case(case)["t2w"].data) * (0.6 / 0.45) ** 2
    assert abs(len(tissue) / expected_voxels - 1) < 0.05

    case, values = _zero_background_case(tmp_path, lambda rng, shape: rng.normal(300.0, 77.0, shape))
    [t2w, *_] = aligned_channels(read_case(case), (3.0, 0.45, 0.45))
    assert abs(t2w[t2w != 0].mean() - values.mean()) < 2.0
