"""FCMAE's dense emulation of the sparse encoder, its decoder and loss, and the format-B export."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from pfq.model import ModelSpec
from pfq.pretrain import model as M

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


def _spec(**kw) -> M.FCMAESpec:
    return M.FCMAESpec(kw.pop("encoder", TINY), **{"decoder_dim": 16, **kw})


def _randomised(spec: M.FCMAESpec, seed: int = 0) -> dict:
    """Non-trivial values everywhere (GRN and biases away from 0), so no term can hide."""
    params = M.init_params(spec, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    out = []
    for k, v in zip(keys, leaves, strict=True):
        noise = jax.random.normal(k, v.shape)
        out.append(v + 0.2 * noise if v.ndim == 1 else noise / math.sqrt(max(1, math.prod(v.shape[:-1]))))
    return jax.tree.unflatten(treedef, out)


def _image(seed: int, shape=(2, 16, 32, 32, 3)) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def _dense_map(model, x):
    """The dense encoder's stage-3 feature map, through the dense modules' own __call__."""
    enc = model.encoder
    for i in range(4):
        for layer in enc.downsample_layers[i]:
            x = layer(x)
        for block in enc.stages[i]:
            x = block(x)
    return x


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grn_stats, batch", [pytest.param("batch", 1, marks=pytest.mark.slow), ("sample", 1), ("sample", 2)]
)
def test_nothing_masked_equals_the_dense_encoder(grn_stats, batch):
    spec = _spec(grn_stats=grn_stats)
    params = _randomised(spec)
    x = _image(1, (batch, 16, 32, 32, 3))
    keep_all = jnp.zeros((batch, 1, 2, 2))
    model = M.bind(spec, params)
    z = model.encode(x, keep_all)
    np.testing.assert_allclose(z, _dense_map(model, x), atol=2e-5, rtol=1e-5)
    # ... and pooling + final norm gives exactly what the dense ConvNeXtV2 returns
    pooled = model.encoder.norm(jnp.mean(z, axis=(1, 2, 3)))
    np.testing.assert_allclose(pooled, model.encoder(x), atol=2e-5, rtol=1e-5)


def test_batch_grn_statistic_couples_samples():
    spec = _spec(grn_stats="batch")
    model = M.bind(spec, _randomised(spec))
    x = _image(2)
    z = model.encode(x, jnp.zeros((2, 1, 2, 2)))
    assert float(jnp.max(jnp.abs(z - _dense_map(model, x)))) > 1e-4  # upstream's batch-global GRN


@pytest.mark.parametrize("grn_stats", [pytest.param("batch", marks=pytest.mark.slow), "sample"])
def test_masked_voxels_never_reach_the_encoder(grn_stats):
    spec = _spec(grn_stats=grn_stats)
    params = _randomised(spec)
    x = _image(3, (2, 32, 32, 32, 3))
    mask = M.random_mask(jax.random.key(4), 2, (2, 2, 2), 0.6)
    removed = M.upsample(mask, M.PATCH)[..., None]
    noisy = x + 100.0 * removed * _image(5, x.shape)
    z, z_noisy = M.encode(spec, params, x, mask), M.encode(spec, params, noisy, mask)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(z_noisy))
    np.testing.assert_array_equal(np.asarray(z)[np.asarray(mask) == 1], 0.0)
    pred, pred_noisy = M.decode(spec, params, z, mask), M.decode(spec, params, z_noisy, mask)
    np.testing.assert_array_equal(np.asarray(pred), np.asarray(pred_noisy))
    # The encoder output's gradient with respect to masked voxels is exactly zero (and not elsewhere).
    weights = _image(6, z.shape)
    grad = jax.grad(lambda img: jnp.sum(M.encode(spec, params, img, mask) * weights))(x)
    grad, removed = np.asarray(grad), np.asarray(removed)[..., 0] == 1
    assert np.all(grad[removed] == 0.0)
    assert np.mean(grad[~removed] != 0.0) > 0.99


# ----------------------------------------------------------------------------------------------
# An independent sparse reference: MinkowskiEngine semantics on coordinate lists, in numpy.
# ----------------------------------------------------------------------------------------------
def _ln(f, scale, bias):
    mu = f.mean(-1, keepdims=True)
    var = ((f - mu) ** 2).mean(-1, keepdims=True)
    return (f - mu) / np.sqrt(var + 1e-6) * scale + bias


class Sparse:
    """Active sites as a coordinate list (n, d, h, w) with one feature row each."""

    def __init__(self, coords: np.ndarray, feats: np.ndarray):
        self.coords, self.feats = coords, feats
        self.row = {tuple(c): i for i, c in enumerate(coords.tolist())}

    def neighbours(self, offset) -> tuple[np.ndarray, np.ndarray]:
        """(rows with an active neighbour at `offset`, that neighbour's rows)."""
        pairs = [
            (i, self.row.get((c[0], c[1] + offset[0], c[2] + offset[1], c[3] + offset[2])))
            for i, c in enumerate(self.coords.tolist())
        ]
        pairs = [(i, j) for i, j in pairs if j is not None]
        return np.array([i for i, _ in pairs], int), np.array([j for _, j in pairs], int)


def _sparse_block(x: Sparse, p: dict) -> Sparse:
    k = np.asarray(p["dwconv"]["kernel"], np.float64)[:, :, :, 0]  # (7, 7, 7, C), cross-correlation
    y = np.tile(np.asarray(p["dwconv"]["bias"], np.float64), (len(x.feats), 1))
    for a in range(7):
        for b in range(7):
            for c in range(7):
                rows, nbrs = x.neighbours((a - 3, b - 3, c - 3))
                if len(rows):
                    y[rows] += x.feats[nbrs] * k[a, b, c]
    y = _ln(y, np.asarray(p["norm"]["scale"]), np.asarray(p["norm"]["bias"]))
    y = y @ np.asarray(p["pwconv1"]["kernel"], np.float64) + np.asarray(p["pwconv1"]["bias"])
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    g = np.sqrt((y**2).sum(0))  # over every active row of every sample: MinkowskiGRN
    y = np.asarray(p["grn"]["gamma"]) * (y * g / (g.mean() + 1e-6)) + np.asarray(p["grn"]["beta"]) + y
    y = y @ np.asarray(p["pwconv2"]["kernel"], np.float64) + np.asarray(p["pwconv2"]["bias"])
    return Sparse(x.coords, x.feats + y)


def _sparse_downsample(x: Sparse, norm: dict, conv: dict, stride: int) -> Sparse:
    f = _ln(x.feats, np.asarray(norm["scale"]), np.asarray(norm["bias"]))
    w = np.asarray(conv["kernel"], np.float64)  # (k, k, k, in, out), offsets {0..k-1} * stride
    out: dict[tuple, np.ndarray] = {}
    for c, row in zip(x.coords.tolist(), f, strict=True):
        q = (c[0], c[1] // stride, c[2] // stride, c[3] // stride)
        off = [c[i + 1] - q[i + 1] * stride for i in range(3)]
        out[q] = out.get(q, 0.0) + row @ w[off[0], off[1], off[2]]
    coords = np.array(sorted(out))
    return Sparse(coords, np.stack([out[tuple(c)] for c in coords.tolist()]) + np.asarray(conv["bias"]))


def sparse_reference(params: dict, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Upstream's sparse encoder on kept sites; returns `.dense()` (zeros at masked sites)."""
    enc = jax.tree.map(lambda v: np.asarray(v, np.float64), params["encoder"])
    stem, stem_norm = enc["downsample_layers"][0][0], enc["downsample_layers"][0][1]
    n, d, h, w, c = image.shape
    patches = image.reshape(n, d // 4, 4, h // 4, 4, w // 4, 4, c)
    dense = np.einsum("ndahbwce,abcef->ndhwf", patches, stem["kernel"]) + stem["bias"]
    dense = _ln(dense, stem_norm["scale"], stem_norm["bias"])
    keep0 = np.asarray(M.upsample(1 - mask, 4)) == 1
    coords = np.argwhere(keep0)
    x = Sparse(coords, dense[keep0])
    for i in range(4):
        if i:
            norm, conv = enc["downsample_layers"][i][0], enc["downsample_layers"][i][1]
            x = _sparse_downsample(x, norm, conv, 2 if i < 3 else 1)
        for blk in enc["stages"][i].values():
            x = _sparse_block(x, blk)
    out = np.zeros(mask.shape + (x.feats.shape[-1],))
    out[tuple(x.coords.T)] = x.feats
    return out


def test_dense_emulation_matches_a_sparse_reference():
    enc = ModelSpec(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    spec = _spec(encoder=enc, grn_stats="batch")
    params = _randomised(spec, seed=7)
    x = _image(8, (2, 32, 32, 32, 3))
    mask = M.random_mask(jax.random.key(9), 2, (2, 2, 2), 0.6)
    ref = sparse_reference(params, np.asarray(x, np.float64), np.asarray(mask))
    got = np.asarray(M.encode(spec, params, x, mask))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
def test_mask_keeps_upstream_count():
    mask = np.asarray(M.random_mask(jax.random.key(0), 5, (2, 2, 2), 0.6))
    assert mask.shape == (5, 2, 2, 2)
    assert (mask.reshape(5, -1).sum(1) == 8 - int(8 * 0.4)).all()  # int() floors: 3 kept, 5 removed
    assert len({m.tobytes() for m in mask}) > 1


def test_patchify_round_trip_and_order():
    x = _image(0, (1, 32, 16, 16, 3))
    p = M.patchify(x)
    assert p.shape == (1, 2, 1, 1, 16**3 * 3)
    np.testing.assert_array_equal(M.unpatchify(p, 3), x)
    # channel fastest, then W, H, D within the patch (upstream's permute (0, 2, 4, 6, 3, 5, 7, 1))
    np.testing.assert_array_equal(p[0, 1, 0, 0, :6], np.asarray(x)[0, 16, 0, 0:2, :].reshape(-1))


def test_norm_pix_target_is_unbiased_and_constant_patches_give_zero():
    x = _image(1, (1, 16, 16, 16, 3))
    t = np.asarray(M.normalised_target(x)).reshape(-1)
    assert abs(t.mean()) < 1e-5 and abs(t.var(ddof=1) - 1) < 1e-4  # ddof=1, as torch's .var
    const = np.asarray(M.normalised_target(jnp.full((1, 16, 16, 16, 3), 3.0)))
    np.testing.assert_array_equal(const, 0.0)


def test_decoder_and_loss_match_a_torch_reference():
    torch = pytest.importorskip("torch")
    from pfq.pretrain.export import fcmae_state_dict
    from tests.torch_reference import Block

    class Decoder(torch.nn.Module):
        """Upstream `FCMAE.forward_decoder` + `forward_loss` (dense ops), written from the spec."""

        def __init__(self, e, cd, pd, depth):
            super().__init__()
            self.mask_token = torch.nn.Parameter(torch.zeros(1, cd, 1, 1, 1))
            self.proj = torch.nn.Conv3d(e, cd, kernel_size=1)
            self.decoder = torch.nn.Sequential(*[Block(cd) for _ in range(depth)])
            self.pred = torch.nn.Conv3d(cd, pd, kernel_size=1)

        def forward(self, imgs, z, mask):  # imgs (N, C, D, H, W), z (N, E, gd, gh, gw), mask (N, gd, gh, gw)
            x = self.proj(z)
            m = mask.unsqueeze(1).type_as(x)
            x = x * (1.0 - m) + self.mask_token.repeat(x.shape[0], 1, *x.shape[2:]) * m
            pred = self.pred(self.decoder(x))
            n, c = pred.shape[:2]
            pred = torch.einsum("ncl->nlc", pred.reshape(n, c, -1))
            p = 16
            nn_, ch, d, h, w = imgs.shape
            t = imgs.reshape(nn_, ch, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
            t = t.reshape(nn_, -1, p**3 * ch)
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1.0e-6) ** 0.5
            loss = ((pred - t) ** 2).mean(dim=-1)
            mask = mask.reshape(n, -1)
            return (loss * mask).sum() / mask.sum(), pred

    spec = _spec(decoder_depth=2)
    params = _randomised(spec, seed=3)
    x = _image(4, (2, 32, 32, 16, 3))
    mask = M.random_mask(jax.random.key(5), 2, (2, 2, 1), 0.5)
    z = M.encode(spec, params, x, mask)
    loss, pred = M.forward(spec, params, x, mask)

    ref = Decoder(TINY.embed_dim, spec.decoder_dim, spec.patch_dim, spec.decoder_depth)
    sd = {k: torch.from_numpy(v) for k, v in fcmae_state_dict(spec, params).items() if not k.startswith("encoder.")}
    ref.load_state_dict(sd, strict=True)
    to_t = lambda a, perm: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(perm)))
    with torch.no_grad():
        ref_loss, ref_pred = ref(to_t(x, (0, 4, 1, 2, 3)), to_t(z, (0, 4, 1, 2, 3)), torch.from_numpy(np.asarray(mask)))
    np.testing.assert_allclose(np.asarray(pred).reshape(ref_pred.shape), ref_pred.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)


def test_format_b_export_round_trips_through_the_converter(tmp_path):
    from pfq.convert import load_model_dir
    from pfq.pretrain.export import encoder_variables, save_format_b

    spec = _spec()
    params = _randomised(spec, seed=11)
    src = save_format_b(tmp_path / "fcmae.safetensors", spec, params)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_weights.py"), str(src), str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _, variables, meta = load_model_dir(tmp_path / "model")
    assert meta["source_format"] == "B"
    want = encoder_variables(params)["params"]["encoder"]
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables["params"]["encoder"], want
    )


def test_grn_gradient_is_finite_when_a_channel_is_zero_everywhere():
    """torch.norm's gradient at 0 is 0; a plain sqrt would make the whole step's gradient NaN (seen when
    finetuning from an encoder pretrained with FCMAE's std-1 initialisation)."""
    from pfq.model.convnext import GRN

    grn = GRN(4)
    grn.gamma[...] = jnp.ones(4)
    x = _image(0, (1, 2, 2, 2, 4)).at[..., 0].set(0.0)
    grad = jax.grad(lambda v: jnp.sum(grn(v) ** 2))(x)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.slow
def test_fcmae_gradient_is_finite_when_a_channel_is_zero_everywhere():
    spec = _spec()
    params = _randomised(spec)
    pw1 = params["encoder"]["stages"][3][0]["pwconv1"]
    pw1["bias"] = pw1["bias"].at[0].set(-1e4)  # GELU channel 0 is exactly 0 at every site
    x, mask = _image(1), M.random_mask(jax.random.key(2), 2, (1, 2, 2), 0.6)
    grads = jax.grad(lambda p: M.forward(spec, p, x, mask)[0])(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
