"""Fidelity metrics between a sample and its full-compute reference (videos in [-1, 1]).

Thin wrappers over torchmetrics' PSNR and SSIM (no weights, nothing downloaded): they fix the data
range of ditopt's videos and fold frames into the batch, so a video is scored as its frames are.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _frames(v: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W] (images pass through), in float64."""
    if v.dim() == 5:
        v = v.transpose(1, 2).flatten(0, 1)
    return v.double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over whole tensors; inf when they are equal."""
    return float(peak_signal_noise_ratio(a.double(), b.double(), data_range=data_range))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM over frames (Gaussian window `window` x `window`) for videos or images."""
    return float(structural_similarity_index_measure(_frames(a), _frames(b), data_range=data_range,
                                                     kernel_size=window, sigma=sigma))
