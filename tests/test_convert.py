"""Conversion of ProFound PyTorch checkpoints (formats A, B, C) against a PyTorch reference.

Parity is the point: logits and features of the converted pfq model must be within 1e-5 (fp32) of
the reference, a tolerance that typical mistakes (tanh GELU, swapped axes, un-reversed sparse
kernels) exceed by orders of magnitude.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from pfq import predict
from pfq.convert import ConvertError, convert_checkpoint, convert_file, export_torch, load_model_dir
from pfq.convert import fcmae as fcmae_mod
from pfq.convert.cli import main as convert_main
from pfq.convert.infer import infer_spec
from pfq.convert.layout import expected_torch_shapes
from pfq.model import SIZES, ModelSpec, apply, features
from tests.torch_reference import Classifier, ConvNeXtV2, fcmae_state_dict, randomize

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]
SMALL = "atto"
SMALL_INPUT = (3, 16, 32, 32)


def _extras() -> dict:
    return {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
        },
        "epoch": 41,
        "scaler": {"scale": 65536.0, "_growth_tracker": 7},
        "args": argparse.Namespace(
            model="convnextv2_atto", input_size=[16, 32, 32], nb_classes=4, lr=None, finetune="checkpoint-799.pth"
        ),
    }


@functools.cache
def _forward(spec: ModelSpec, with_logits: bool):
    @jax.jit
    def run(v, x):
        logits = apply(spec, v, x)[0] if with_logits else None
        return logits, features(spec, v, x)

    return run


def pfq_outputs(spec: ModelSpec, variables: dict, x_ncdhw: np.ndarray, with_logits: bool = True):
    """(logits or None, features) from one jitted call (cached per spec), input moved to channels-last."""
    x = jax.numpy.asarray(x_ncdhw.transpose(0, 2, 3, 4, 1))
    logits, feats = _forward(spec, with_logits)(variables, x)
    return (None if logits is None else np.asarray(logits)), np.asarray(feats)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


class Reference:
    """A randomised PyTorch classifier, its outputs, and checkpoints of it in formats A, B and C."""

    def __init__(self, root: Path, size: str, shape: tuple[int, ...], num_classes: int = 4, seed: int = 0):
        depths, dims = SIZES[size]
        self.encoder = ConvNeXtV2(shape[0], depths, dims)
        self.model = randomize(Classifier(self.encoder, num_classes), seed)
        self.x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed + 100))
        with torch.no_grad():
            self.logits = self.model(self.x).numpy()
            self.features = self.encoder(self.x).numpy()
        self.root = root

    def write_a(self, name: str = "a.pth.tar") -> Path:
        path = self.root / name
        torch.save({"model": self.model.state_dict(), **_extras()}, path)
        return path

    def identity_norm_encoder(self) -> ConvNeXtV2:
        """The encoder as FCMAE would give it: no final LayerNorm (identity)."""
        enc = ConvNeXtV2(
            self.x.shape[1],
            [len(s) for s in self.encoder.stages],
            [self.encoder.stages[i][0].dwconv.weight.shape[0] for i in range(4)],
        )
        sd = {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("norm.")}
        enc.load_state_dict(sd, strict=False)
        return enc.eval()

    def write_b(self, name: str = "checkpoint-799.pth") -> tuple[Path, np.ndarray]:
        enc = self.identity_norm_encoder()
        with torch.no_grad():
            feats = enc(self.x).numpy()
        path = self.root / name
        torch.save({"model": fcmae_state_dict(enc), **_extras()}, path)
        return path, feats

    def write_c(self, name: str = "encoder.pt", prefix: str = "module.encoder.") -> Path:
        path = self.root / name
        torch.save({prefix + k: v for k, v in self.encoder.state_dict().items()}, path)
        return path


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("ref"), SMALL, SMALL_INPUT)


@pytest.fixture(scope="module")
def model_a(ref) -> Path:
    dest = ref.root / "pfq_a"
    convert_file(ref.write_a(), dest)
    return dest


# ---------------------------------------------------------------------------------------------- parity


def test_format_a_parity(ref, model_a):
    spec, variables, meta = load_model_dir(model_a)
    assert meta["source_format"] == "A" and meta["size"] == SMALL and meta["num_classes"] == 4
    assert meta["source_extras"]["epoch"] == 41 and meta["source_extras"]["args"]["nb_classes"] == 4
    assert meta["torch_buffers"] == {"head.1.num_batches_tracked": 1234}
    assert isinstance(next(iter(variables["params"]["encoder"]["stages"])), int)
    logits, feats = pfq_outputs(spec, variables, ref.x.numpy())
    print(f"\nA {SMALL}: logits {max_diff(logits, ref.logits):.2e} features {max_diff(feats, ref.features):.2e}")
    assert max_diff(logits, ref.logits) <= TOL
    assert max_diff(feats, ref.features) <= TOL


def test_format_b_parity(ref):
    src, want = ref.write_b()
    dest = ref.root / "pfq_b"
    convert_file(src, dest)
    spec, variables, meta = load_model_dir(dest)
    assert meta["source_format"] == "B" and meta["num_classes"] is None
    assert set(variables["params"]) == {"encoder"} and variables["batch_stats"] == {}
    assert meta["source_filled_keys"] == ["encoder.norm.weight", "encoder.norm.bias"]
    assert "mask_token" in meta["source_dropped_keys"] and "pred.weight" in meta["source_dropped_keys"]
    assert len(meta["source_dropped_keys"]) == 15  # mask_token, proj x2, decoder x10, pred x2
    _, feats = pfq_outputs(spec, variables, ref.x.numpy(), with_logits=False)
    print(f"\nB {SMALL}: features {max_diff(feats, want):.2e}")
    assert max_diff(feats, want) <= TOL
    # exported back, it is exactly the dense encoder (final norm identity), strictly loadable
    from safetensors.numpy import load_file

    export_torch(dest, ref.root / "b.safetensors")
    got = load_file(str(ref.root / "b.safetensors"))
    dense = ref.identity_norm_encoder()
    want_sd = {k: v.numpy() for k, v in dense.state_dict().items()}
    assert sorted(got) == sorted(want_sd)
    assert all(np.array_equal(_bits(got[k]), _bits(v)) for k, v in want_sd.items())
    dense.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=True)


@pytest.mark.parametrize("prefix,suffix", [("module.encoder.", ".pt"), ("", ".safetensors")])
def test_format_c_parity(ref, prefix, suffix):
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        src = ref.root / "encoder.safetensors"
        save_file({k: v.contiguous() for k, v in ref.encoder.state_dict().items()}, src)
    else:
        src = ref.write_c(prefix=prefix)
    out = convert_checkpoint(src)
    assert out.metadata["source_format"] == "C" and set(out.variables["params"]) == {"encoder"}
    _, feats = pfq_outputs(out.spec, out.variables, ref.x.numpy(), with_logits=False)
    print(f"\nC {SMALL} {suffix}: features {max_diff(feats, ref.features):.2e}")
    assert max_diff(feats, ref.features) <= TOL


def test_tiny_parity(tmp_path):
    """ProFound's own size at a reduced input; one jitted call for logits and features."""
    tiny = Reference(tmp_path, "tiny", (3, 32, 64, 64), seed=3)
    out = convert_checkpoint(tiny.write_a())
    assert out.spec.depths == SIZES["tiny"][0] and out.spec.dims == SIZES["tiny"][1]
    logits, feats = pfq_outputs(out.spec, out.variables, tiny.x.numpy())
    print(f"\nA tiny: logits {max_diff(logits, tiny.logits):.2e} features {max_diff(feats, tiny.features):.2e}")
    assert max_diff(logits, tiny.logits) <= TOL
    assert max_diff(feats, tiny.features) <= TOL


def test_bfloat16_checkpoint_converts_exactly(ref):
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ref.model.state_dict().items()}
    torch.save({"model": sd}, ref.root / "bf16.pth")
    out = convert_checkpoint(ref.root / "bf16.pth")
    got = out.variables["params"]["encoder"]["stages"][2][1]["pwconv1"]["kernel"]
    want = sd["encoder.stages.2.1.pwconv1.weight"].float().numpy().T
    assert got.dtype == np.float32 and np.array_equal(got, want)


# ------------------------------------------------------------------- the tolerance catches real mistakes


def test_unreversed_sparse_kernels_are_caught(ref, monkeypatch):
    src, want = ref.write_b("checkpoint-wrong.pth")

    def c_order_conv(v):  # the likeliest bug: read the flat kernel index as (kd, kh, kw)
        ks = fcmae_mod.cube_side(v.shape[0])
        return v.reshape(ks, ks, ks, v.shape[1], v.shape[2]).transpose(4, 3, 0, 1, 2)

    def c_order_depthwise(v):
        ks = fcmae_mod.cube_side(v.shape[0])
        return v.reshape(ks, ks, ks, v.shape[1]).transpose(3, 0, 1, 2)[:, None]

    monkeypatch.setattr(fcmae_mod, "sparse_conv_to_dense", c_order_conv)
    monkeypatch.setattr(fcmae_mod, "sparse_depthwise_to_dense", c_order_depthwise)
    out = convert_checkpoint(src)
    _, feats = pfq_outputs(out.spec, out.variables, ref.x.numpy(), with_logits=False)
    assert max_diff(feats, want) > 100 * TOL


def test_tanh_gelu_and_swapped_axes_are_caught(ref, model_a):
    spec, variables, _ = load_model_dir(model_a)
    logits, _ = pfq_outputs(spec, variables, ref.x.numpy())
    tanh_model = randomize(Classifier(ConvNeXtV2(3, *SIZES[SMALL], gelu="tanh"), 4), 0)
    with torch.no_grad():
        tanh_logits = tanh_model(ref.x).numpy()
    assert max_diff(logits, ref.logits) <= TOL < max_diff(logits, tanh_logits)
    swapped, _ = pfq_outputs(spec, variables, ref.x.numpy().swapaxes(3, 4))  # H <-> W
    assert max_diff(swapped, ref.logits) > 100 * TOL


# ------------------------------------------------------------------------------- export and round trip


def test_round_trip_is_bitwise_and_loads_strictly(ref, model_a):
    from safetensors.numpy import load_file

    dest = ref.root / "roundtrip.safetensors"
    export_torch(model_a, dest)
    got = load_file(str(dest))
    want = {k: v.numpy() for k, v in ref.model.state_dict().items()}
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert np.array_equal(_bits(got[k]), _bits(v)), k
    clone = Classifier(ConvNeXtV2(3, *SIZES[SMALL]), 4)
    clone.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(clone.eval()(ref.x), ref.model(ref.x))

    enc_dest = ref.root / "export_encoder.safetensors"
    export_torch(model_a, enc_dest, encoder_only=True)
    enc = ConvNeXtV2(3, *SIZES[SMALL])
    enc.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(enc_dest)).items()}, strict=True)


# ------------------------------------------------------------------------------------- size inference


def doc_shape_table(depths, dims, in_chans: int, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """Upstream dense names and shapes, written out from the spec's table A.2."""
    t = {
        "encoder.downsample_layers.0.0.weight": (dims[0], in_chans, 4, 4, 4),
        "encoder.downsample_layers.0.0.bias": (dims[0],),
        "encoder.downsample_layers.0.1.weight": (dims[0],),
        "encoder.downsample_layers.0.1.bias": (dims[0],),
    }
    for i in (1, 2, 3):
        k = 1 if i == 3 else 2
        p = f"encoder.downsample_layers.{i}"
        t[f"{p}.0.weight"] = t[f"{p}.0.bias"] = (dims[i - 1],)
        t[f"{p}.1.weight"] = (dims[i], dims[i - 1], k, k, k)
        t[f"{p}.1.bias"] = (dims[i],)
    for i, (n, d) in enumerate(zip(depths, dims, strict=True)):
        for j in range(n):
            p = f"encoder.stages.{i}.{j}"
            t |= {
                f"{p}.dwconv.weight": (d, 1, 7, 7, 7),
                f"{p}.dwconv.bias": (d,),
                f"{p}.norm.weight": (d,),
                f"{p}.norm.bias": (d,),
                f"{p}.pwconv1.weight": (4 * d, d),
                f"{p}.pwconv1.bias": (4 * d,),
                f"{p}.grn.gamma": (1, 1, 1, 1, 4 * d),
                f"{p}.grn.beta": (1, 1, 1, 1, 4 * d),
                f"{p}.pwconv2.weight": (d, 4 * d),
                f"{p}.pwconv2.bias": (d,),
            }
    t["encoder.norm.weight"] = t["encoder.norm.bias"] = (dims[-1],)
    if num_classes is not None:
        t |= {
            "head.0.weight": (256, dims[-1]),
            "head.0.bias": (256,),
            "head.1.weight": (256,),
            "head.1.bias": (256,),
            "head.1.running_mean": (256,),
            "head.1.running_var": (256,),
            "head.1.num_batches_tracked": (),
            "head.3.weight": (num_classes, 256),
            "head.3.bias": (num_classes,),
        }
    return t


@pytest.mark.parametrize("size", list(SIZES))
def test_size_inference_every_preset(size):
    depths, dims = SIZES[size]
    spec = ModelSpec(depths, dims, in_chans=3, num_classes=4)
    assert infer_spec(doc_shape_table(depths, dims, 3, 4), with_head=True) == spec
    enc = infer_spec(doc_shape_table(depths, dims, 3, None), with_head=False)
    assert (enc.depths, enc.dims, enc.in_chans) == (spec.depths, spec.dims, 3)


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_model_table_matches_the_spec(size):
    """pfq's own names/shapes (from abstract_variables) equal the spec's table: 207 entries for tiny."""
    spec = ModelSpec.from_size(size, num_classes=4)
    table = expected_torch_shapes(spec)
    assert table == doc_shape_table(*SIZES[size], 3, 4)
    assert size != "tiny" or len(table) == 207


def test_size_inference_in_chans_and_forcing():
    spec = ModelSpec.from_size("femto", in_chans=1, num_classes=7)
    shapes = expected_torch_shapes(spec)
    assert infer_spec(shapes, with_head=True) == spec
    assert infer_spec(shapes, with_head=True, size="femto", in_chans=1, num_classes=7) == spec
    with pytest.raises(ConvertError, match="--num-classes"):
        infer_spec(shapes, with_head=False, num_classes=3)
    with pytest.raises(ConvertError) as e:
        infer_spec({"encoder.norm.weight": (384,)}, with_head=True)
    assert "missing: encoder.downsample_layers.0.0.weight" in str(e.value)


def test_forced_wrong_size_lists_mismatches(ref):
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(ref.write_a("forced.pth"), size="femto")
    assert (
        "wrong shape: encoder.downsample_layers.0.0.weight: got (40, 3, 4, 4, 4), expected (48, 3, 4, 4, 4)"
    ) in str(e.value)


# ------------------------------------------------------------------------------ wrong input, CLI, store


def test_wrong_keys_are_listed_and_nothing_is_written(ref, capsys):
    sd = ref.model.state_dict()
    del sd["encoder.stages.1.0.grn.beta"]
    sd["encoder.stages.1.0.extra.weight"] = torch.zeros(3)
    sd["head.0.bias"] = torch.zeros(255)
    torch.save({"model": sd}, ref.root / "broken.pth")
    dest = ref.root / "broken_out"
    assert convert_main([str(ref.root / "broken.pth"), str(dest)]) == 2
    err = capsys.readouterr().err
    assert "missing: encoder.stages.1.0.grn.beta (expected shape (1, 1, 1, 1, 320))" in err
    assert "unexpected: encoder.stages.1.0.extra.weight" in err
    assert "wrong shape: head.0.bias: got (255,), expected (256,)" in err
    assert not dest.exists()
    assert not [p for p in ref.root.iterdir() if p.name.startswith(".broken_out")]


def test_no_clobber_and_overwrite(ref, model_a, capsys):
    src = ref.write_c("c_for_clobber.pt", prefix="")
    before = (model_a / "pfq_model.json").read_text()
    assert convert_main([str(src), str(model_a)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (model_a / "pfq_model.json").read_text() == before
    other = ref.root / "clobber_me"
    other.mkdir()
    (other / "junk").write_text("x")
    assert convert_main([str(src), str(other), "--overwrite"]) == 0
    assert not (other / "junk").exists()
    assert json.loads((other / "pfq_model.json").read_text())["source_format"] == "C"
    assert convert_main(["--to-torch", str(other), str(ref.root / "c.safetensors")]) == 0
    assert convert_main(["--to-torch", str(other), str(ref.root / "c.safetensors")]) == 2


def test_predict_cli(ref, model_a, tmp_path):
    x = np.concatenate([ref.x.numpy(), ref.x.numpy()[:1]])  # N=3 with batch size 2: a padded last batch
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    assert (
        predict.main(
            [
                "--checkpoint",
                str(model_a),
                "--array",
                str(tmp_path / "x.npy"),
                "--output",
                str(out),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    y = np.load(out)
    assert y.shape == (3, 4)
    assert max_diff(y, np.concatenate([ref.logits, ref.logits[:1]])) <= TOL


def test_predict_encoder_only_needs_features(ref, tmp_path, capsys):
    dest = tmp_path / "enc"
    convert_file(ref.write_c("c_predict.pt"), dest)
    np.save(tmp_path / "x.npy", ref.x.numpy())
    args = ["--checkpoint", str(dest), "--array", str(tmp_path / "x.npy"), "--output", str(tmp_path / "f.npy")]
    assert predict.main(args) == 2 and "--features" in capsys.readouterr().err
    assert predict.main(args + ["--features"]) == 0
    assert max_diff(np.load(tmp_path / "f.npy"), ref.features) <= TOL


def test_converter_runs_without_torch(ref, tmp_path):
    """The CLI converts A, B, C, exports back and refuses a hostile pickle in a process where
    `import torch` fails."""
    a, (b, _), c = ref.write_a("nt_a.pth"), ref.write_b("nt_b.pth"), ref.write_c("nt_c.pt")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from pfq.convert.cli import main
        for src, dest in [({str(a)!r}, "A"), ({str(b)!r}, "B"), ({str(c)!r}, "C")]:
            assert main([src, {str(tmp_path)!r} + "/" + dest]) == 0, src
        assert main(["--to-torch", {str(tmp_path)!r} + "/A", {str(tmp_path)!r} + "/a.safetensors"]) == 0
        assert main([{str(evil)!r}, {str(tmp_path)!r} + "/evil_out"]) == 2
        assert sys.modules["torch"] is None
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert json.loads((tmp_path / "B" / "pfq_model.json").read_text())["source_format"] == "B"
    assert "refusing global os.system" in proc.stderr
    assert not marker.exists() and not (tmp_path / "evil_out").exists()
