"""PyTorch ProFound-Conv (3-D ConvNeXt-V2 encoder + classifier head), the benchmarks' reference.

Written from docs/profound-checkpoints.md sections 0.3 and A (upstream `models/convnextv2.py`
and `models/classifier.py`): state-dict names match upstream, so `load_pfq_variables` can copy a
pfq model's parameters in and the two networks can be compared output for output.
Benchmark/test code only: PyTorch is never a pfq runtime dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

LN_EPS = 1e-6
BN_EPS = 1e-5
HEAD_HIDDEN = 256


class LayerNormCF(nn.Module):
    """Upstream's channels_first LayerNorm: normalise over C of (N, C, D, H, W)."""

    def __init__(self, dim: int, eps: float = LN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class GRN(nn.Module):
    """Global response normalisation on channels-last (N, D, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()  # exact erf form, as upstream
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 4, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        y = y.permute(0, 4, 1, 2, 3)
        return x + drop_path(y, self.drop_path_rate, self.training)


class ConvNeXtV2(nn.Module):
    def __init__(self, depths: Sequence[int], dims: Sequence[int], in_chans: int = 3,
                 drop_path_rate: float = 0.0):
        super().__init__()
        layers = [nn.Sequential(nn.Conv3d(in_chans, dims[0], 4, stride=4), LayerNormCF(dims[0]))]
        for i in range(1, 4):
            k = 1 if i == 3 else 2  # upstream's last transition is a 1x1x1 stride-1 conv
            conv = nn.Conv3d(dims[i - 1], dims[i], k, stride=k)
            layers.append(nn.Sequential(LayerNormCF(dims[i - 1]), conv))
        self.downsample_layers = nn.ModuleList(layers)
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        stages, cur = [], 0
        for i in range(4):
            stages.append(nn.Sequential(*[Block(dims[i], rates[cur + j]) for j in range(depths[i])]))
            cur += depths[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.norm(x.mean([-3, -2, -1]))


class BatchNorm1dAnyBatch(nn.BatchNorm1d):
    """BatchNorm1d that, like pfq's (Flax) one, also trains on a batch of 1, where torch raises.

    Same state-dict keys; only the size check is skipped (the real-size benchmark uses batch 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] > 1:
            return super().forward(x)
        self.num_batches_tracked += 1
        mean, var = x.mean(0), x.var(0, unbiased=False)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Classifier(nn.Module):
    def __init__(self, encoder: ConvNeXtV2, num_classes: int, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(embed_dim, HEAD_HIDDEN),
                                  BatchNorm1dAnyBatch(HEAD_HIDDEN, eps=BN_EPS),
                                  nn.ReLU(), nn.Linear(HEAD_HIDDEN, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build(depths: Sequence[int], dims: Sequence[int], in_chans: int = 3, num_classes: int = 2,
          drop_path_rate: float = 0.0) -> Classifier:
    return Classifier(ConvNeXtV2(depths, dims, in_chans, drop_path_rate), num_classes, dims[-1])


def load_pfq_variables(model: Classifier, variables: dict) -> None:
    """Copy pfq variables ({"params", "batch_stats"}, state-dict-shaped paths) into `model`."""
    flat: dict[str, np.ndarray] = {}

    def walk(prefix: str, tree) -> None:
        if isinstance(tree, dict):
            for k, v in tree.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = np.asarray(tree)

    walk("", variables["params"])
    walk("", variables["batch_stats"])
    state = model.state_dict()
    new = {}
    for key, ref in state.items():
        if key.endswith("num_batches_tracked"):
            new[key] = ref
            continue
        stem, leaf = key.rsplit(".", 1)
        if leaf == "weight":
            cands = [f"{stem}.kernel", f"{stem}.scale"]
        elif leaf == "running_mean":
            cands = [f"{stem}.mean"]
        elif leaf == "running_var":
            cands = [f"{stem}.var"]
        else:
            cands = [key]
        src = next((flat[c] for c in cands if c in flat), None)
        if src is None:
            raise KeyError(f"no pfq variable for torch key {key} (tried {cands})")
        if src.ndim == 5:  # conv kernel (kd, kh, kw, in, out) -> (out, in, kd, kh, kw)
            src = src.transpose(4, 3, 0, 1, 2)
        elif src.ndim == 2:  # dense (in, out) -> (out, in)
            src = src.T
        new[key] = torch.from_numpy(np.ascontiguousarray(src)).reshape(ref.shape).to(ref.dtype)
    model.load_state_dict(new)
