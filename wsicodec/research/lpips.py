"""LPIPS v0.1 (Zhang et al., CVPR 2018) with AlexNet or VGG16, loaded from local weights only.

    LPIPS(net="alex" | "vgg", weights_path=None)       # nn.Module, frozen, eval mode
    lpips(x, y) -> (N,) distances; x, y are (N,3,H,W) float in [-1, 1]
    lpips.pooled_features(x) -> (N, D)                   # global-average-pooled taps, concatenated
    lpips_weights_dir() -> Path                          # where the .safetensors files are looked for

Weights: ``lpips_alexnet_full.safetensors`` / ``lpips_vgg16_full.safetensors`` holding the
torchvision ``features.*`` backbone plus the ``lin{k}.model.1.weight`` heads. Looked for in
``weights_path`` (a file or a folder), else ``$WSICODEC_LPIPS_WEIGHTS`` (a folder), else
``$WSICODEC_SHARED/weights/lpips``, else ``<repo>/../shared/weights/lpips``.

The metric: inputs are shifted/scaled by LPIPS's fixed ImageNet-like constants, each tapped
feature map is unit-normalised along channels, the squared difference is weighted per channel by
the learned 1x1 heads, averaged over space and summed over the taps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from wsicodec._paths import shared_dir
from wsicodec.errors import WsicodecError

_FILES = {"alex": "lpips_alexnet_full.safetensors", "vgg": "lpips_vgg16_full.safetensors"}

# (kind, out_channels, kernel, stride, padding) for conv, ("relu",), ("pool", k, s)
_ALEX = [
    ("conv", 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
    ("conv", 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
    ("conv", 384, 3, 1, 1), ("relu",),
    ("conv", 256, 3, 1, 1), ("relu",),
    ("conv", 256, 3, 1, 1), ("relu",),
]
_ALEX_TAPS = (1, 4, 7, 9, 11)


def _vgg_layers():
    layers = []
    for block, (width, n) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]):
        if block:
            layers.append(("pool", 2, 2))
        for _ in range(n):
            layers += [("conv", width, 3, 1, 1), ("relu",)]
    return layers


_VGG = _vgg_layers()
_VGG_TAPS = (3, 8, 15, 22, 29)

# LPIPS's fixed input normalisation, for inputs in [-1, 1]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def lpips_weights_dir() -> Path:
    env = os.environ.get("WSICODEC_LPIPS_WEIGHTS")
    if env:
        return Path(env)
    return shared_dir() / "weights" / "lpips"


def _resolve(net: str, weights_path: str | Path | None) -> Path:
    name = _FILES[net]
    if weights_path is not None:
        p = Path(weights_path)
        path = p / name if p.is_dir() else p
    else:
        path = lpips_weights_dir() / name
    if not path.is_file():
        raise WsicodecError(
            f"LPIPS weights not found at {path}: put {name} there, or point WSICODEC_LPIPS_WEIGHTS at the folder holding it"
        )
    return path


class LPIPS(nn.Module):
    """Learned perceptual distance; gradients flow to the inputs, the weights are frozen."""

    def __init__(self, net: str = "alex", weights_path: str | Path | None = None):
        super().__init__()
        if net not in _FILES:
            raise WsicodecError(f"unknown LPIPS network {net!r}: use 'alex' or 'vgg'")
        from safetensors.torch import load_file

        path = _resolve(net, weights_path)
        try:
            state = load_file(str(path))
        except Exception as exc:  # corrupt file: one line, not a traceback
            raise WsicodecError(f"cannot read LPIPS weights {path}: {exc}") from None
        spec, taps = (_ALEX, _ALEX_TAPS) if net == "alex" else (_VGG, _VGG_TAPS)
        self.net_name = net
        self.taps = taps
        layers: list[nn.Module] = []
        cin = 3
        for item in spec[: max(taps) + 1]:
            if item[0] == "conv":
                _, cout, k, s, p = item
                layers.append(nn.Conv2d(cin, cout, k, s, p))
                cin = cout
            elif item[0] == "relu":
                layers.append(nn.ReLU(inplace=False))
            else:
                layers.append(nn.MaxPool2d(item[1], item[2]))
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList()
        for k, _ in enumerate(taps):
            w = state[f"lin{k}.model.1.weight"]
            lin = nn.Conv2d(w.shape[1], 1, 1, bias=False)
            lin.weight.data.copy_(w)
            self.lins.append(lin)
        feat_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing, unexpected = self.features.load_state_dict(feat_state, strict=False)
        if missing:
            raise WsicodecError(f"LPIPS weights {path} lack {len(missing)} backbone tensors (e.g. {missing[0]})")
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen: BN-free, but keep eval semantics explicit
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    @staticmethod
    def _unit(f: torch.Tensor) -> torch.Tensor:
        return f / (torch.sqrt((f * f).sum(dim=1, keepdim=True)) + 1e-10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) pair in [-1,1] -> (N,) LPIPS distances."""
        fx, fy = self._taps(x), self._taps(y)
        total = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy):
            d = (self._unit(a) - self._unit(b)) ** 2
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [-1,1] -> (N, D): each tap averaged over space, concatenated.

        A stand-in embedding for offline use (not a pathology foundation model)."""
        return torch.cat([f.mean(dim=(2, 3)) for f in self._taps(x)], dim=1)
