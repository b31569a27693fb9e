"""Kokoro-82M's forward pass for a batch of segments of different lengths, each item as exact as alone.

KModel.forward_with_tokens is written for one segment (`pred_dur.squeeze()`, a 1-D repeat_interleave
alignment, `.squeeze()` of the audio). This is the same model composed from KModel's own submodules for
a batch right-padded to its longest item. Padding would change every item but the longest, so:
- ALBERT gets the attention mask, and both text encoders their padding mask and lengths (they pack);
- the duration LSTM and F0/N's shared LSTM run packed by tokens and by frames (unpacked, their backward
  direction would start inside the padding);
- padded tokens get 0 frames (not clamp(min=1)), and frames take their token's features by the
  cumulative durations: the one-hot alignment matmul's exact result, without a [B, L, T] tensor;
- every AdaIN masks its statistics and output (torch_masked), and convolutions see zero padding;
- the harmonic source runs batched, each item's phase and STFT exactly its own (see _harmonic_spectrum);
- the iSTFT zeroes the padding's spectrum and divides each item by its own window envelope.
Inputs and outputs on the frame axis are zero beyond each item's frames; callers trim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.utils import remove_weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.nn.utils.weight_norm import WeightNorm

from speakd.server.engines.kokoro.modules import kokoro_module
from speakd.server.engines.kokoro.torch_masked import adain_resblk1d, adain_resblock1, time_mask
from speakd.server.errors import ModelError

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, slots=True)
class AcousticBatch:
    """The acoustic stage's batched output, zero beyond each item's frames."""

    asr: Tensor  # [B, 512, T]
    f0: Tensor  # [B, 2T]
    energy: Tensor  # [B, 2T]
    durations: Tensor  # [B, L] frames per token (BOS/EOS included), 0 on padded tokens
    frames: Tensor  # [B] on the CPU: sum of each item's durations


def prepare(kmodel: Any) -> None:
    """Fail at load time on a KModel variant these forwards do not reproduce, and make the iSTFTNet
    window a buffer and fold weight norm, before the model moves to its device. This changes `kmodel`:
    its state dict then holds plain weights instead of weight_g and weight_v.

    kokoro's TorchSTFT keeps its window as a plain attribute, so `.to(device)` leaves it on the CPU and
    every STFT and iSTFT would copy it to the GPU again."""
    stft_class = kokoro_module("istftnet").TorchSTFT
    stft = kmodel.decoder.generator.stft
    if not isinstance(stft, stft_class) or stft.win_length != stft.filter_length:
        raise ModelError("the batched torch engine needs KModel's TorchSTFT (disable_complex=False)")
    norms = [m for m in kmodel.modules() if isinstance(m, torch.nn.InstanceNorm1d)]
    if any(norm.track_running_stats for norm in norms):
        raise ModelError("the batched torch engine needs instance norms without running statistics")
    if "window" not in stft._buffers:
        window = stft.__dict__.pop("window")
        stft.register_buffer("window", window, persistent=False)  # not in checkpoints: rebuilt
    # Weight norm recomputes each weight from (g, v) before every call: ~270 small kernels a vocoder
    # pass. Folding it once gives the very same weights (the same function of g and v).
    for module in kmodel.modules():
        if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
            remove_weight_norm(module)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory, so the copy does not block the host
    (the stream orders it before the kernels that read it)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _packed_lstm(lstm: Any, x: Tensor, lengths: Tensor) -> Tensor:
    """A biLSTM over [B, T, C] that stops at each item's length (CPU lengths); zero beyond."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    result: Tensor = padded
    return result


def _frame_tokens(durations: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(token index of each frame [B, T], frame validity [B, T]) from the cumulative durations."""
    ends = durations.cumsum(dim=1)
    steps = torch.arange(total, device=durations.device).expand(durations.shape[0], total).contiguous()
    token = torch.searchsorted(ends, steps, right=True)  # tokens that end at or before the frame
    valid = steps < ends[:, -1:]
    return token.clamp(max=durations.shape[1] - 1), valid


def _align(features: Tensor, token: Tensor, valid: Tensor) -> Tensor:
    """[B, L, C] token features → [B, T, C] frame features (each frame copies its token's row)."""
    index = token[:, :, None].expand(-1, -1, features.shape[-1])
    return torch.gather(features, 1, index) * valid[:, :, None].to(features.dtype)


def _curve(blocks: Any, projection: Any, x: Tensor, prosody: Tensor, mask: Tensor) -> Tensor:
    """The F0 or energy branch of F0Ntrain: AdaIN blocks (one upsamples x2), then a 1x1 projection."""
    for block in blocks:
        x, mask = adain_resblk1d(block, x, prosody, mask)
    curve: Tensor = (projection(x) * mask).squeeze(1)
    return curve


def acoustic(kmodel: Any, input_ids: Tensor, lengths: Tensor, style: Tensor, speeds: Tensor) -> AcousticBatch:
    """Tokens [B, L] (BOS/EOS included, right-padded; lengths [B] on the CPU), styles [B, 256] and
    speeds [B] → aligned features, F0, energy and durations."""
    device, predictor = input_ids.device, kmodel.predictor
    padding = torch.arange(input_ids.shape[1], device=device)[None, :] >= to_device(lengths, device)[:, None]
    hidden = kmodel.bert(input_ids, attention_mask=(~padding).int())
    d_en = kmodel.bert_encoder(hidden).transpose(-1, -2)
    prosody = style[:, 128:]
    d = predictor.text_encoder(d_en, prosody, lengths, padding)  # [B, L, 640], zero on padding
    x = _packed_lstm(predictor.lstm, d, lengths)
    raw = torch.sigmoid(predictor.duration_proj(x)).sum(dim=-1) / speeds[:, None]
    durations = torch.round(raw).clamp(min=1).long().masked_fill(padding, 0)
    frames = durations.sum(dim=1).cpu()
    token, valid = _frame_tokens(durations, int(frames.max()))
    en = _align(d, token, valid)
    shared = _packed_lstm(predictor.shared, en, frames).transpose(-1, -2)
    mask = valid[:, None, :].to(shared.dtype)
    f0 = _curve(predictor.F0, predictor.F0_proj, shared, prosody, mask)
    energy = _curve(predictor.N, predictor.N_proj, shared, prosody, mask)
    t_en = kmodel.text_encoder(input_ids, lengths, padding)  # [B, 512, L]
    asr = _align(t_en.transpose(-1, -2), token, valid).transpose(-1, -2)
    return AcousticBatch(asr=asr, f0=f0, energy=energy, durations=durations, frames=frames)


def _harmonic_spectrum(generator: Any, f0: Tensor, f0_steps: list[int]) -> Tensor:
    """The harmonic source's STFT, magnitude and phase stacked: [B, n_fft + 2, K], zero beyond each
    item's frames. f0 [B, S] is zero beyond each item's f0_steps.

    Each item must compute exactly what it computes alone: frames at either end of an item are
    symmetric, so their spectrum is real and torch.angle returns ±π by the sign of a rounding error.
    So the batch runs KModel's own modules, and:
    - SineGen runs on the whole batch. Its phase is a cumulative sum over F0 steps; zero F0 in the
      padding adds exact zeros, so past an item's end the phase stays at its last value, and the linear
      upsampling of the phase reads there the very value it reads alone (where it clamps);
    - the 9 → 1 harmonic merge (a Linear and tanh) runs per item: a matrix product's rounding depends
      on its row count, and 1-ulp differences in the source could flip those ±π;
    - the STFT's centre padding reflects each item's own end: the batch's reflection is right at every
      item's start, and the samples after each item's end are rewritten as its reflection;
    - frames past an item's end are zeroed: the convolutions that read them alone see zeros there."""
    stft, source_module = generator.stft, generator.m_source
    n_fft, hop, pad = stft.filter_length, stft.hop_length, stft.filter_length // 2
    per_step = int(generator.f0_upsamp.scale_factor)  # samples per F0 step
    upsampled = generator.f0_upsamp(f0[:, None]).transpose(1, 2)  # [B, N, 1]
    sines, _, _ = source_module.l_sin_gen(upsampled)  # [B, N, harmonics]
    source = sines.new_zeros(sines.shape[0], sines.shape[1] + 2 * pad)
    for i, steps in enumerate(f0_steps):
        # With the very strides it has alone (channels first in memory): a GEMM may pick its kernel
        # by the leading dimension.
        alone = sines[i : i + 1, : steps * per_step].transpose(1, 2).contiguous().transpose(1, 2)
        merged = source_module.l_tanh(source_module.l_linear(alone))
        source[i, pad : pad + steps * per_step] = merged[0, :, 0]
    ends = to_device(torch.tensor(f0_steps), f0.device)[:, None] * per_step  # each item's sample count
    offsets = torch.arange(1, pad + 1, device=f0.device)[None, :]
    # Reflections: padded position pad - j holds sample j, and position ends + pad - 1 + j holds
    # sample ends - 1 - j, for j = 1 … pad.
    source[:, :pad] = source[:, pad + 1 : 2 * pad + 1].flip(1)
    source.scatter_(1, ends + pad - 1 + offsets, source.gather(1, ends + pad - 1 - offsets))
    spectrum = torch.stft(
        source, n_fft, hop, n_fft, window=stft.window, center=False, return_complex=True
    )  # [B, n_fft/2 + 1, N/hop + 1]
    frames = torch.arange(spectrum.shape[-1], device=f0.device)[None, None, :]
    valid = frames <= ends[:, :, None] // hop
    magnitude = torch.where(valid, torch.abs(spectrum), 0.0)
    phase = torch.where(valid, torch.angle(spectrum), 0.0)
    return torch.cat([magnitude, phase], dim=1)


def per_item_istft(stft: Any, magnitude: Tensor, phase: Tensor, frame_mask: Tensor) -> Tensor:
    """torch.istft (center, hann) per item: padded frames get an exactly zero spectrum and each item is
    divided by its own window envelope (the batch's would count the padded frames near its end)."""
    n_fft, hop = stft.filter_length, stft.hop_length
    window = stft.window.to(device=magnitude.device, dtype=magnitude.dtype)
    batch, frames = magnitude.shape[0], magnitude.shape[-1]
    spectrum = (magnitude * frame_mask) * torch.exp(phase * 1j)
    segments = torch.fft.irfft(spectrum, n=n_fft, dim=1) * window[:, None]  # [B, n_fft, K]
    length = n_fft + hop * (frames - 1)

    def overlap_add(x: Tensor) -> Tensor:
        added: Tensor = F.fold(x, (1, length), (1, n_fft), stride=(1, hop)).reshape(batch, length)
        return added[:, n_fft // 2 : length - n_fft // 2]

    signal = overlap_add(segments)
    envelope = overlap_add(window.square()[None, :, None] * frame_mask)
    return torch.where(envelope > 1e-11, signal / envelope, 0.0)


def _full_precision(device: torch.device) -> Any:
    """A region where autocast (bf16/fp16) is off: what needs fp32 runs there on fp32 inputs."""
    return torch.autocast(device.type, enabled=False)


def _generate(generator: Any, x: Tensor, timbre: Tensor, har: Tensor, mask: Tensor) -> Tensor:
    """The iSTFTNet generator on decoder output x (zero padding) and the harmonic source's spectrum →
    audio [B, N]."""
    kernels = generator.num_kernels
    for i, (up, noise_conv, noise_res) in enumerate(
        zip(generator.ups, generator.noise_convs, generator.noise_res, strict=True)
    ):
        x = up(F.leaky_relu(x, negative_slope=0.1))
        mask = mask.repeat_interleave(up.stride[0], dim=-1)
        if i == generator.num_upsamples - 1:
            # One reflected step in front: each item's length becomes its source spectrum's frame count.
            x = generator.reflection_pad(x)
            mask = F.pad(mask, (1, 0), value=1.0)
        source = adain_resblock1(noise_res, noise_conv(har), timbre, mask)
        x = x + source
        total = adain_resblock1(generator.resblocks[i * kernels], x, timbre, mask)
        for j in range(1, kernels):
            total = total + adain_resblock1(generator.resblocks[i * kernels + j], x, timbre, mask)
        x = total / kernels * mask  # the next upsampler or conv_post reads across the item's end
    bins = generator.post_n_fft // 2 + 1
    with _full_precision(x.device):  # log-magnitudes: exp() would turn bf16 rounding into gain errors
        x = generator.conv_post(F.leaky_relu(x.float()))
        return per_item_istft(generator.stft, torch.exp(x[:, :bins]), torch.sin(x[:, bins:]), mask.float())


def vocode(kmodel: Any, asr: Tensor, f0: Tensor, energy: Tensor, timbre: Tensor, frames: Tensor) -> Tensor:
    """Features zero beyond each item's frames (asr [B, 512, T], f0/energy [B, 2T]), timbres [B, 128]
    and frame counts [B] on the CPU → audio [B, 600·T]; item i's audio is its first 600·frames[i]
    samples."""
    decoder = kmodel.decoder
    mask = time_mask(to_device(frames, asr.device), asr.shape[-1], asr.dtype)
    f0_steps = (frames * (f0.shape[-1] // asr.shape[-1])).tolist()
    # Under autocast (bf16/fp16) the source and the STFTs stay in fp32: the source's phase is a sum of
    # ~1e5 rad, and half-precision cuFFT takes only powers of two (n_fft is 20). First, too: SineGen
    # copies its harmonic numbers to the device from pageable memory, which blocks the host until the
    # stream is idle; here that is before the decoder's kernels are queued, not after.
    with _full_precision(asr.device):
        har = _harmonic_spectrum(decoder.generator, f0.float(), f0_steps)
        f0_down = decoder.F0_conv(f0[:, None])  # two tiny convolutions of the curves, kept in fp32
        energy_down = decoder.N_conv(energy[:, None])
    x, _ = adain_resblk1d(decoder.encode, torch.cat([asr, f0_down, energy_down], dim=1), timbre, mask)
    asr_res = decoder.asr_res(asr)
    upsampled = False
    for block in decoder.decode:
        if not upsampled:
            x = torch.cat([x, asr_res, f0_down, energy_down], dim=1)
        x, mask = adain_resblk1d(block, x, timbre, mask)
        upsampled = upsampled or block.upsample_type != "none"
    return _generate(decoder.generator, x * mask, timbre, har, mask)
