"""Whole-segment rational resampling (windowed-sinc polyphase FIR) with numpy only.

The model renders each segment as one 24 kHz block, so the resampler works on whole blocks: no
streaming state, and the filter delay is removed so output sample n lines up with input time n/dst.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt

# Passband flat up to 0.9 of the lower Nyquist, stopband from the lower Nyquist on. 65 dB of design
# attenuation leaves margin over the 60 dB target for the Kaiser estimate's error and float32 taps.
_PASS_EDGE = 0.9
_ATTENUATION_DB = 65.0


@lru_cache(maxsize=32)
def _design(up: int, down: int) -> tuple[npt.NDArray[np.float32], int]:
    """Polyphase bank (row p = taps p, p+up, p+2*up, ...) of the low-pass FIR, and its delay.

    The filter runs at the upsampled rate; its delay (N - 1) / 2 is an integer because N is odd.
    """
    nyquist = 0.5 / max(up, down)  # lower Nyquist, in cycles per upsampled sample
    transition = (1.0 - _PASS_EDGE) * nyquist
    cutoff = nyquist - transition / 2
    beta = 0.1102 * (_ATTENUATION_DB - 8.7)
    taps = math.ceil((_ATTENUATION_DB - 7.95) / (2.285 * 2 * math.pi * transition)) + 1
    taps += 1 - taps % 2
    delay = (taps - 1) // 2
    t = np.arange(taps, dtype=np.float64) - delay
    h = 2 * cutoff * np.sinc(2 * cutoff * t) * np.kaiser(taps, beta)
    h *= up / h.sum()  # zero stuffing divides the level by `up`; restore unity DC gain
    per_phase = -(-taps // up)
    bank = np.zeros(per_phase * up, dtype=np.float64)
    bank[:taps] = h
    polyphase = np.ascontiguousarray(bank.reshape(per_phase, up).T, dtype=np.float32)
    polyphase.flags.writeable = False
    return polyphase, delay


def _fast_length(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n: FFT sizes pocketfft handles quickly, with little padding."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def resample(samples: npt.NDArray[np.float32], src_rate: int, dst_rate: int) -> npt.NDArray[np.float32]:
    """Resample a whole mono block from `src_rate` to `dst_rate`, delay-compensated.

    Returns round(len * dst / src) samples; equal rates return `samples` itself. Every polyphase
    branch is one FFT convolution of the block, so the cost is a few FFTs of its length.
    """
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    if samples.ndim != 1:
        raise ValueError(f"expected a mono 1-D block, got shape {samples.shape}")
    if src_rate == dst_rate:
        return samples
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    n_in = len(samples)
    n_out = round(n_in * up / down)
    if n_out == 0:
        return np.zeros(0, dtype=np.float32)
    polyphase, delay = _design(up, down)
    # Output n sits at upsampled index n*down + delay: branch `phase` of the bank, whose full
    # convolution with the input is read at input index `base`.
    pos = np.arange(n_out, dtype=np.int64) * down + delay
    phase, base = pos % up, pos // up
    size = _fast_length(max(n_in + polyphase.shape[1] - 1, int(base[-1]) + 1))
    spectrum = np.fft.rfft(samples.astype(np.float32, copy=False), size)
    branches = np.fft.irfft(np.fft.rfft(polyphase, size, axis=1) * spectrum, size, axis=1)
    return branches[phase, base].astype(np.float32, copy=False)
