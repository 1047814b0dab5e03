"""A small PatchGAN discriminator and its losses, for train and finetune.

    D = PatchDiscriminator(channels=32, layers=3)    # (N,3,H,W) in [-1,1] -> (N,1,h,w) patch logits
    d_loss(real_logits, fake_logits, kind="hinge"|"ls") -> scalar
    g_loss(fake_logits, kind="hinge"|"ls") -> scalar

PatchGAN (Isola et al., 2017): strided 4x4 convolutions, each output judging one receptive-field
patch; spectral norm instead of batch norm keeps it stable at the small batches used on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

GAN_LOSSES = ("hinge", "ls")


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int = 32, layers: int = 3, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = channels
        for i in range(1, layers):
            c_next = min(channels * 2**i, channels * 8)
            mods += [spectral_norm(nn.Conv2d(c, c_next, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            c = c_next
        mods += [spectral_norm(nn.Conv2d(c, c, 4, 1, 1)), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; use one of {GAN_LOSSES}")


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss: real -> high, fake -> low."""
    _check(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())
    return 0.5 * (((real_logits - 1) ** 2).mean() + (fake_logits**2).mean())


def g_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator (decoder) adversarial loss."""
    _check(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    return ((fake_logits - 1) ** 2).mean()
