"""Fidelity metrics between a sample and its full-compute reference (videos in [-1, 1])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over whole tensors; inf when they are equal."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM over frames, Gaussian window, for [B, C, F, H, W] (or [B, C, H, W]) tensors."""
    if a.dim() == 5:
        a = a.transpose(1, 2).flatten(0, 1)
        b = b.transpose(1, 2).flatten(0, 1)
    a, b = a.double(), b.double()
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, -1)
    kernel = (g.transpose(1, 2) @ g).view(1, 1, window, window).repeat(a.shape[1], 1, 1, 1)

    def blur(x):
        return F.conv2d(F.pad(x, [window // 2] * 4, mode="reflect"), kernel, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean().item()
