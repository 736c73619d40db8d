"""The one PyTorch ProFound-Conv (3-D ConvNeXt-V2 encoder + classifier head), for tests and benchmarks.

Written from docs/checkpoints.md ("Numeric definitions" and format A: upstream `models/convnextv2.py` and
`models/classifier.py`), not from pfq, so that comparing the two networks checks pfq against the spec.
Test and benchmark code only: PyTorch is never a pfq runtime dependency.

`ConvNeXtV2` is the dense 3-D encoder (features = final LayerNorm of the global mean; optional
drop-path), `Classifier` adds the Linear-BN1d-ReLU-Linear head; their state-dict names are upstream's.
`build` makes a classifier from depths/dims (benchmarks/bench_step.py), `randomize` fills a model
with non-trivial values, and `fcmae_state_dict`
writes an encoder in the FCMAE sparse format (spec B.2), i.e. the inverse of upstream's remap, with a
small decoder so the dropped keys are present.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEAD_HIDDEN = 256


class LayerNorm(nn.Module):
    """eps 1e-6, biased variance; "channels_first" normalises dim 1 of an NCDHW tensor."""

    def __init__(self, dim: int, data_format: str = "channels_last", eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.data_format, self.dim = eps, data_format, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class GRN(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of the residual branch with probability `rate`."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, gelu: str = "none", drop_path_rate: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate=gelu)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + drop_path(y.permute(0, 4, 1, 2, 3), self.drop_path_rate, self.training)


class ConvNeXtV2(nn.Module):
    def __init__(
        self, in_chans: int, depths: Sequence[int], dims: Sequence[int], gelu: str = "none", drop_path_rate: float = 0.0
    ):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm(dims[0], "channels_first"))]
        )
        for i in range(1, 4):
            k = 1 if i == 3 else 2  # the last transition is 1x1x1 with stride 1
            conv = nn.Conv3d(dims[i - 1], dims[i], kernel_size=k, stride=k)
            self.downsample_layers.append(nn.Sequential(LayerNorm(dims[i - 1], "channels_first"), conv))
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()  # upstream: linear in depth
        starts = np.cumsum([0, *depths]).tolist()
        self.stages = nn.ModuleList(
            [nn.Sequential(*[Block(dims[i], gelu, rates[starts[i] + j]) for j in range(depths[i])]) for i in range(4)]
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.norm(x.mean(dim=(2, 3, 4)))


class BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """BatchNorm1d that, like pfq's (Flax) one, also trains on a batch of 1, where torch raises.

    Same state-dict keys, and torch's own forward for eval or batches > 1; only batch-1 training
    differs (biased variance, as there is no unbiased one); the real-size benchmark uses batch 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] > 1:
            return super().forward(x)
        self.num_batches_tracked += 1
        mean, var = x.mean(0), x.var(0, correction=0)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Classifier(nn.Module):
    def __init__(self, encoder: ConvNeXtV2, num_classes: int):
        super().__init__()
        self.encoder = encoder
        dim = encoder.norm.normalized_shape[0]
        self.head = nn.Sequential(
            nn.Linear(dim, HEAD_HIDDEN),
            BatchNorm1dAnyBatch(HEAD_HIDDEN),
            nn.ReLU(),
            nn.Linear(HEAD_HIDDEN, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build(
    depths: Sequence[int], dims: Sequence[int], in_chans: int = 3, num_classes: int = 2, drop_path_rate: float = 0.0
) -> Classifier:
    return Classifier(ConvNeXtV2(in_chans, depths, dims, drop_path_rate=drop_path_rate), num_classes)


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values everywhere: weights ~ N(0, 0.02) (convs scaled by fan-in), norm scales near 1,
    biases, GRN gamma/beta and BN statistics all away from 0/1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("gamma") or name.endswith("beta"):
            p.copy_(0.3 * noise)
        elif p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        else:
            fan_in = p[0].numel()
            p.copy_(noise / fan_in**0.5)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
            b.fill_(1234)
    return model.eval()


def _sparse_conv(w: torch.Tensor) -> torch.Tensor:
    """(out, in, a, b, c) -> (k^3, in, out) with flat index a + k*b + k^2*c (MinkowskiEngine order)."""
    k = w.shape[-1]
    return w.permute(4, 3, 2, 1, 0).reshape(k**3, w.shape[1], w.shape[0]).contiguous()


def _sparse_depthwise(w: torch.Tensor) -> torch.Tensor:
    """(C, 1, a, b, c) -> (k^3, C)."""
    k = w.shape[-1]
    return w[:, 0].permute(3, 2, 1, 0).reshape(k**3, w.shape[0]).contiguous()


@torch.no_grad()
def fcmae_state_dict(
    encoder: ConvNeXtV2, decoder_dim: int = 16, patch: int = 16, seed: int = 1
) -> OrderedDict[str, torch.Tensor]:
    """The FCMAE `model` state dict (spec B.2) whose remap gives `encoder` (minus its final norm)."""
    g = torch.Generator().manual_seed(seed)
    sd = encoder.state_dict()
    in_chans = sd["downsample_layers.0.0.weight"].shape[1]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    out["mask_token"] = torch.zeros(1, decoder_dim, 1, 1, 1)
    out["encoder.downsample_layers.0.0.weight"] = sd["downsample_layers.0.0.weight"].clone()
    out["encoder.downsample_layers.0.0.bias"] = sd["downsample_layers.0.0.bias"].clone()
    out["encoder.downsample_layers.0.1.weight"] = sd["downsample_layers.0.1.weight"].clone()
    out["encoder.downsample_layers.0.1.bias"] = sd["downsample_layers.0.1.bias"].clone()
    for i in (1, 2, 3):
        p = f"downsample_layers.{i}"
        out[f"encoder.{p}.0.ln.weight"] = sd[f"{p}.0.weight"].clone()
        out[f"encoder.{p}.0.ln.bias"] = sd[f"{p}.0.bias"].clone()
        w = sd[f"{p}.1.weight"]
        out[f"encoder.{p}.1.kernel"] = w[:, :, 0, 0, 0].T.contiguous() if i == 3 else _sparse_conv(w)
        out[f"encoder.{p}.1.bias"] = sd[f"{p}.1.bias"][None].clone()
    for i, stage in enumerate(encoder.stages):
        for j in range(len(stage)):
            p = f"stages.{i}.{j}"
            out[f"encoder.{p}.dwconv.kernel"] = _sparse_depthwise(sd[f"{p}.dwconv.weight"])
            out[f"encoder.{p}.dwconv.bias"] = sd[f"{p}.dwconv.bias"][None].clone()
            out[f"encoder.{p}.norm.ln.weight"] = sd[f"{p}.norm.weight"].clone()
            out[f"encoder.{p}.norm.ln.bias"] = sd[f"{p}.norm.bias"].clone()
            for lin in ("pwconv1", "pwconv2"):  # sparse blocks register GRN after pwconv2
                out[f"encoder.{p}.{lin}.linear.weight"] = sd[f"{p}.{lin}.weight"].clone()
                out[f"encoder.{p}.{lin}.linear.bias"] = sd[f"{p}.{lin}.bias"].clone()
            out[f"encoder.{p}.grn.gamma"] = sd[f"{p}.grn.gamma"].reshape(1, -1).clone()
            out[f"encoder.{p}.grn.beta"] = sd[f"{p}.grn.beta"].reshape(1, -1).clone()
    e = sd["norm.weight"].shape[0]
    rnd = lambda *s: 0.02 * torch.randn(*s, generator=g)
    out["proj.weight"], out["proj.bias"] = rnd(decoder_dim, e, 1, 1, 1), rnd(decoder_dim)
    decoder = Block(decoder_dim)
    for k, v in decoder.state_dict().items():
        out[f"decoder.0.{k}"] = rnd(*v.shape)
    n_pred = patch**3 * in_chans
    out["pred.weight"], out["pred.bias"] = rnd(n_pred, decoder_dim, 1, 1, 1), rnd(n_pred)
    return out
