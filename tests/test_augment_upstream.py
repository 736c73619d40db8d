"""The `upstream` augmentation preset against upstream's MONAI transforms as specified: probabilities
and ranges of the draws, the geometry's conventions (rotation, zoom, pad and crop), the bias field
and the Gaussian smoothing against independent formulas, and its wiring into pipeline and configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.special import eval_legendre
from scipy.stats import norm

from pfq.config import base_config, validate_config
from pfq.data import augment_upstream as au
from pfq.data.pipeline import AugmentConfig, augment

SHAPE = (10, 16, 16)


def plain(shape=SHAPE, **changes) -> au.UpstreamDraw:
    """No transform fires; the crop sits where the padding put the volume."""
    padded = au.padded_shape(shape, shape)
    start = tuple((p - n) // 2 for p, n in zip(padded, shape, strict=True))
    fields = dict(
        angles=None, zoom=None, crop_start=start, flip=False, scale=None, shift=None, bias_coeffs=None, sigma=None
    )
    return au.UpstreamDraw(**{**fields, **changes})


def volume(shape=SHAPE, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape + (channels,)).astype(np.float32)


def test_draw_probabilities_and_ranges_are_upstreams():
    n = 4000
    draws = [au.draw(np.random.default_rng(i), SHAPE) for i in range(n)]
    rates = {
        "rotate": (0.3, [d.angles is not None for d in draws]),
        "zoom": (0.3, [d.zoom is not None for d in draws]),
        "flip": (0.5, [d.flip for d in draws]),
        "scale": (0.8, [d.scale is not None for d in draws]),
        "shift": (0.8, [d.shift is not None for d in draws]),
        "bias": (0.2, [d.bias_coeffs is not None for d in draws]),
        "smooth": (1.0, [d.sigma is not None for d in draws]),
    }
    for name, (p, fired) in rates.items():
        assert abs(np.mean(fired) - p) <= 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12, name
    angles = np.array([d.angles for d in draws if d.angles is not None])
    assert np.abs(angles).max() <= np.deg2rad(10) and np.abs(angles).max() > np.deg2rad(9.5)
    zooms = np.array([d.zoom for d in draws if d.zoom is not None])
    assert zooms.min() >= 0.9 and zooms.max() <= 1.1 and np.std(zooms[:, 0] - zooms[:, 1]) > 0.05  # per axis
    assert max(abs(d.scale) for d in draws if d.scale is not None) <= 0.1
    assert max(abs(d.shift) for d in draws if d.shift is not None) <= 0.1
    coeffs = np.array([d.bias_coeffs for d in draws if d.bias_coeffs is not None])
    assert coeffs.shape[1] == 20 and coeffs.min() >= 0 and coeffs.max() <= 0.1  # degree 3 in 3-D: 20 terms
    sigmas = np.array([d.sigma for d in draws])
    assert sigmas.min() >= 0.25 and sigmas.max() <= 1.5
    # The crop lands anywhere in the volume padded to round(1.2 x size): offsets 0 .. 2, 0 .. 3, 0 .. 3.
    starts = np.array([d.crop_start for d in draws if d.angles is None])
    assert starts.min(0).tolist() == [0, 0, 0] and starts.max(0).tolist() == [2, 3, 3]


def test_crop_in_the_padded_volume_is_a_zero_filled_shift():
    v = volume()
    np.testing.assert_array_equal(au.geometry(v, plain()), v)
    start = plain().crop_start
    moved = au.geometry(v, plain(crop_start=(start[0] + 1, start[1] - 1, start[2])))
    np.testing.assert_array_equal(moved[:-1, 1:], v[1:, :-1])
    assert not moved[-1].any() and not moved[:, 0].any()


def test_interpolating_path_agrees_with_the_integer_path():
    v, start = volume(), plain().crop_start
    shifted = plain(crop_start=(start[0], start[1] + 2, start[2] - 1))
    still = au.UpstreamDraw(**{**shifted.__dict__, "angles": (0.0, 0.0, 0.0), "zoom": (1.0, 1.0, 1.0)})
    np.testing.assert_allclose(au.geometry(v, still), au.geometry(v, shifted), atol=1e-6)


def test_rotation_turns_about_the_centre_in_the_h_w_plane():
    # A quarter turn of a cube in MONAI's first angle (the plane of axes 1 and 2) is np.rot90 there.
    shape = (12, 12, 12)
    v = volume(shape, channels=1)
    turned = au.geometry(v, plain(shape, angles=(np.pi / 2, 0.0, 0.0)))
    candidates = [np.rot90(v, k, axes=(1, 2)) for k in (1, -1)]
    assert min(np.abs(turned - c).max() for c in candidates) < 1e-5


def test_zoom_scales_about_the_centre():
    shape = (9, 9, 9)
    ramp = np.broadcast_to(np.arange(1, 10, dtype=np.float32)[:, None, None, None], shape + (1,)).copy()
    zoomed = au.geometry(ramp, plain(shape, zoom=(2.0, 1.0, 1.0)))
    # Output voxel d reads input 4 + (d - 4) / 2, which holds 5 + (d - 4) / 2.
    np.testing.assert_allclose(zoomed[:, 4, 4, 0], 5 + (np.arange(9) - 4) / 2, atol=1e-6)
    # Zooming out reads beyond the edge: the edge value (MONAI's edge padding), not zero.
    out = au.geometry(ramp, plain(shape, zoom=(0.5, 1.0, 1.0)))
    np.testing.assert_allclose(out[:, 4, 4, 0], [1, 1, 1, 3, 5, 7, 9, 9, 9], atol=1e-6)


def test_bias_field_is_monais_legendre_sum():
    shape, rng = (5, 6, 7), np.random.default_rng(0)
    coeffs = tuple(rng.uniform(0, 0.1, 20))
    terms = [(i, j, k) for i in range(4) for j in range(4 - i) for k in range(4 - i - j)]
    x, y, z = (np.linspace(-1, 1, n) for n in shape)
    expected = sum(
        c * eval_legendre(i, x)[:, None, None] * eval_legendre(j, y)[None, :, None] * eval_legendre(k, z)[None, None, :]
        for c, (i, j, k) in zip(coeffs, terms, strict=True)
    )
    np.testing.assert_allclose(au.bias_field(shape, coeffs), expected, atol=1e-6)
    v = volume(shape)
    out = au.apply(v, plain(shape, bias_coeffs=coeffs))
    np.testing.assert_allclose(out, v * np.exp(expected)[..., None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.25, 0.8, 1.5])
def test_gaussian_kernel_is_the_normal_mass_per_voxel(sigma):
    kernel = au.gaussian_kernel(sigma)
    tail = int(max(4 * sigma, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1)
    np.testing.assert_allclose(kernel, norm.cdf(x + 0.5, scale=sigma) - norm.cdf(x - 0.5, scale=sigma), atol=1e-7)


def test_smoothing_matches_a_torch_zero_padded_separable_convolution():
    torch = pytest.importorskip("torch")
    v = volume((6, 9, 8), channels=2)
    sigma = (0.4, 1.3, 0.9)
    got = au.smooth(v, sigma)
    x = torch.from_numpy(np.moveaxis(v, -1, 0)[None].copy())  # (1, C, D, H, W)
    for axis, s in enumerate(sigma):
        k = torch.from_numpy(au.gaussian_kernel(s).astype(np.float32))
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = -1
        weight = k.reshape(shape).repeat(2, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = (len(k) - 1) // 2
        x = torch.nn.functional.conv3d(torch.nn.functional.pad(x, pad), weight, groups=2)
    np.testing.assert_allclose(got, np.moveaxis(x[0].numpy(), 0, -1), atol=1e-5)


def test_intensity_and_flip_act_on_all_channels_alike():
    v = volume()
    out = au.apply(v, plain(flip=True, scale=0.05, shift=-0.07))
    np.testing.assert_allclose(out, v[:, :, ::-1] * 1.05 - 0.07, rtol=1e-6, atol=1e-6)


def test_preset_is_wired_into_the_pipeline_and_the_paper_configs():
    v = volume()
    got = augment(v, np.random.default_rng(5), AugmentConfig(preset="upstream"))
    np.testing.assert_array_equal(got, au.augment_upstream(v, np.random.default_rng(5)))
    assert got.shape == v.shape and got.dtype == np.float32
    assert AugmentConfig.from_config(base_config().data).preset == "pfq"
    for name in ("pirads_binary", "pirads_4class", "isup", "cspca"):
        path = Path(__file__).parent.parent / "configs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert AugmentConfig.from_config(module.get_config().data).preset == "upstream", name
    config = base_config()
    config.data.augment_preset = "monai"
    with pytest.raises(ValueError, match="config.data.augment_preset"):
        validate_config(config)
