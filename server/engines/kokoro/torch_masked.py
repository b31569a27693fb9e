"""Kokoro's AdaIN blocks for padded batches: each item's valid part computes what the item computes alone.

Every AdaIN takes instance-norm statistics over time, and the convolutions after it read their
neighbours, so in a batch padded to the longest item both would see the padding. These forwards
compose the blocks' own submodules but take a time mask ([B, 1, T], 1 on valid steps): the
statistics cover valid steps only, and each AdaIN zeroes the padding of its whole output. Masking the
norm alone would not do: AdaIN adds the style's beta after normalising, and LeakyReLU/Snake of beta is
not zero, so the next convolution would read it across the item's end (the unbatched run reads zeros).

Contract: between blocks the padding may hold anything; a convolution wider than one step only ever
reads an AdaIN's output or a tensor its caller masked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

_RSQRT2 = math.sqrt(0.5)  # KModel's rsqrt(2): the same float32 value


def time_mask(lengths: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, size]: 1 where the step is inside the item's valid length, else 0."""
    steps = torch.arange(size, device=lengths.device)
    return (steps[None, :] < lengths[:, None]).unsqueeze(1).to(dtype)


def masked_adain(adain: Any, x: Tensor, style: Tensor, mask: Tensor) -> Tensor:
    """AdaIN1d with InstanceNorm1d statistics (mean, biased variance, eps, affine) over valid steps only;
    padding of the output is exactly zero."""
    norm = adain.norm
    count = mask.sum(dim=-1, keepdim=True)
    mean = (x * mask).sum(dim=-1, keepdim=True) / count
    centered = (x - mean) * mask
    variance = centered.square().sum(dim=-1, keepdim=True) / count
    with torch.autocast(x.device.type, enabled=False):  # tiny, and (1 + gamma) scales everything
        gamma, beta = adain.fc(style.float())[:, :, None].chunk(2, dim=1)
    # The norm's affine and the style's folded into one scale and shift per channel: fewer passes.
    scale = (1 + gamma) * torch.rsqrt(variance + norm.eps)
    shift = beta
    if norm.affine:
        scale = scale * norm.weight[:, None]
        shift = (1 + gamma) * norm.bias[:, None] + beta
    out: Tensor = (centered * scale + shift) * mask
    return out


def adain_resblk1d(block: Any, x: Tensor, style: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """AdainResBlk1d (prosody F0/N blocks, decoder encode/decode): (output, its mask). An upsampling
    block doubles the time axis, and its mask with it."""
    upsampling = block.upsample_type != "none"
    out_mask = mask.repeat_interleave(2, dim=-1) if upsampling else mask
    h = block.pool(block.actv(masked_adain(block.norm1, x, style, mask)))
    if upsampling:
        # The transposed conv writes its bias into the padding, where conv1 would read it.
        h = h * out_mask
    h = block.conv1(h)
    h = block.conv2(block.actv(masked_adain(block.norm2, h, style, out_mask)))
    shortcut = block.upsample(x)
    if block.learned_sc:
        shortcut = block.conv1x1(shortcut)
    out: Tensor = (h + shortcut) * _RSQRT2
    return out, out_mask


def _snake(x: Tensor, alpha: Tensor) -> Tensor:
    """Snake activation as AdaINResBlock1 computes it; zero at zero, so masked padding stays zero."""
    return x + (1 / alpha) * (torch.sin(alpha * x) ** 2)


def adain_resblock1(block: Any, x: Tensor, style: Tensor, mask: Tensor) -> Tensor:
    """AdaINResBlock1 (the generator's resblocks and noise_res) on a padded batch."""
    for conv1, conv2, adain1, adain2, alpha1, alpha2 in zip(
        block.convs1, block.convs2, block.adain1, block.adain2, block.alpha1, block.alpha2, strict=True
    ):
        h = conv1(_snake(masked_adain(adain1, x, style, mask), alpha1))
        h = conv2(_snake(masked_adain(adain2, h, style, mask), alpha2))
        x = h + x
    return x
