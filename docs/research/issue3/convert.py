"""Convert the embedded Kokoro-82M int8 ONNX graph into a KModel (kokoro==0.9.4) checkpoint.

Usage: python convert.py [model.onnx] [out.pth]

Output layout = KModel's own checkpoint: {'bert': sd, 'bert_encoder': sd, 'predictor': sd,
'text_encoder': sd, 'decoder': sd}. Weights are the *dequantized* int8 weights (so the torch model
reproduces the int8 ONNX model's weights, not the original fp32 Kokoro weights).

Sources of each tensor, in order:
 1. quantized ops found by node name: MatMulInteger (per-column int8 + scale + zp), ConvInteger
    (per-tensor uint8 + scale + zp), Gather+DequantizeLinear (embeddings, per-tensor int8),
    DynamicQuantizeLSTM (per-direction int8, layout [dir, in, 4H], gates iofc);
 2. float weights of Conv / ConvTranspose / MatMul nodes (weight-norm already folded);
 3. float initializers that kept their torch names ("encoder.predictor.F0.0.conv1.bias" ...);
 4. defaults for tensors the graph does not carry (InstanceNorm affine = 1/0, ALBERT pooler).
Weight-normed modules get weight_v = W and weight_g = ||W|| over all dims but 0.
"""
from __future__ import annotations

import collections
import re
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from kconfig import build_kmodel

MODEL = '/tmp/speakd-cache/kokoro-82m-int8-6e742170d309016e/model.onnx'
PARTS = ('bert', 'bert_encoder', 'predictor', 'text_encoder', 'decoder')


class Graph:
    def __init__(self, path: str):
        self.model = onnx.load(path)
        g = self.model.graph
        self.inits = {i.name: i for i in g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.prod = {o: n for n in g.node for o in n.output}
        self.cons = collections.defaultdict(list)
        for n in g.node:
            for x in n.input:
                self.cons[x].append(n)
        self.nodes = list(g.node)

    def arr(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.inits[name])
        return self._arrays[name]

    def is_init(self, name: str) -> bool:
        return name in self.inits

    def weight_scale_of(self, node) -> np.ndarray:
        """Follow ConvInteger/MatMulInteger output (-> Add bias -> Cast) -> Mul(x, scale_product);
        scale_product = Mul(input_scale, weight_scale): return weight_scale (the initializer)."""
        t = node.output[0]
        for _ in range(4):
            (c,) = self.cons[t]
            if c.op_type == 'Mul':
                other = c.input[1] if c.input[0] == t else c.input[0]
                p = self.prod[other]
                assert p.op_type == 'Mul', p
                inits = [x for x in p.input if self.is_init(x)]
                assert len(inits) == 1, p
                return self.arr(inits[0]).astype(np.float32)
            t = c.output[0]
        raise RuntimeError(f'no scale found after {node.name}')


def node_module(name: str) -> str | None:
    """ONNX node name -> KModel attribute path ('decoder.generator.ups.0'), by the exporter's scopes."""
    parts = name.strip('/').split('/')[:-1]
    if not parts:
        return None
    if parts[0] == 'decoder' and len(parts) > 1 and parts[1] == 'decoder':
        parts = ['decoder'] + parts[2:]
    elif parts[0] == 'encoder' and len(parts) > 1:
        if parts[1] in ('bert', 'bert_encoder', 'text_encoder', 'predictor'):
            parts = parts[1:]
        else:  # /encoder/F0.0, /encoder/N.1, /encoder/shared, /encoder/F0_proj: inside ProsodyPredictor
            parts = ['predictor'] + parts[1:]
    else:
        return None
    out = []
    for i, seg in enumerate(parts):
        # nested nn.Sequential scopes: /cnn.0/cnn.0.0/ -> cnn.0.0 ; /asr_res/asr_res.0/ -> asr_res.0
        if i + 1 < len(parts) and parts[i + 1].startswith(seg + '.'):
            continue
        if parts[0] == 'bert':
            seg = re.sub(r'_\d+$', '', seg)  # ALBERT: the shared layer is called 12x: query_1, ffn_3, ...
        out.append(seg)
    return '.'.join(out)


def lstm_reorder(w: np.ndarray, h: int) -> np.ndarray:
    """ONNX gate blocks i,o,f,c -> torch i,f,g(c),o along axis 0."""
    i, o, f, c = (w[k * h:(k + 1) * h] for k in range(4))
    return np.concatenate([i, f, c, o], axis=0)


def convert(path: str = MODEL):
    g = Graph(path)
    kmodel = build_kmodel()
    target = {k: v for k, v in kmodel.state_dict().items()}
    # Plain (fused) weights keyed by module path; weight-norm is resolved at the end.
    weights: dict[str, np.ndarray] = {}     # module path -> folded weight in torch layout
    out: dict[str, np.ndarray] = {}         # full KModel key -> tensor
    sources: dict[str, str] = {}
    seen_modules = collections.defaultdict(set)  # module -> ONNX weight tensors (ALBERT sharing check)

    def put_weight(mod, w, src):
        if mod in weights:
            if not np.array_equal(weights[mod], w):
                raise RuntimeError(f'{mod}: two different weights ({src})')
            return
        weights[mod] = w
        sources[mod + '.weight'] = src

    for n in g.nodes:
        op = n.op_type
        if op == 'MatMulInteger' and g.is_init(n.input[1]):
            mod = node_module(n.name)
            q = g.arr(n.input[1]).astype(np.float32)                  # [in, out] int8
            zp = g.arr(n.input[3]).astype(np.float32) if len(n.input) > 3 and n.input[3] else 0.0
            s = g.weight_scale_of(n)                                  # [out]
            put_weight(mod, ((q - zp) * s).T.copy(), f'{n.name}: {n.input[1]} (int8 per-column)')
            seen_modules[mod].add(n.input[1])
        elif op == 'ConvInteger':
            mod = node_module(n.name)
            q = g.arr(n.input[1]).astype(np.float32)                  # [out, in, k] uint8
            zp = g.arr(n.input[3]).astype(np.float32) if len(n.input) > 3 and n.input[3] else 0.0
            s = g.weight_scale_of(n)                                  # scalar
            put_weight(mod, (q - zp) * s, f'{n.name}: {n.input[1]} (uint8 per-tensor)')
        elif op == 'DequantizeLinear' and n.input[0] in g.prod and g.prod[n.input[0]].op_type == 'Gather':
            gather = g.prod[n.input[0]]
            mod = node_module(gather.name)
            q = g.arr(gather.input[0]).astype(np.float32)
            s = g.arr(n.input[1]).astype(np.float32)
            zp = g.arr(n.input[2]).astype(np.float32) if len(n.input) > 2 else 0.0
            put_weight(mod, (q - zp) * s, f'{gather.name}: {gather.input[0]} (int8 per-tensor)')
        elif op == 'DynamicQuantizeLSTM':
            mod = node_module(n.name)
            h = next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == 'hidden_size')
            W, R, B = (g.arr(x).astype(np.float32) for x in n.input[1:4])
            ws, wz, rs, rz = (g.arr(x).astype(np.float32) for x in n.input[8:12])
            for d, suffix in enumerate(('', '_reverse')):
                wd = ((W[d] - wz[d]) * ws[d]).T                      # [4H, in], iofc
                rd = ((R[d] - rz[d]) * rs[d]).T                      # [4H, H]
                out[f'{mod}.weight_ih_l0{suffix}'] = lstm_reorder(wd, h)
                out[f'{mod}.weight_hh_l0{suffix}'] = lstm_reorder(rd, h)
                out[f'{mod}.bias_ih_l0{suffix}'] = lstm_reorder(B[d, :4 * h], h)
                out[f'{mod}.bias_hh_l0{suffix}'] = lstm_reorder(B[d, 4 * h:], h)
                for k in ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh'):
                    sources[f'{mod}.{k}_l0{suffix}'] = f'{n.name} (int8 per-direction, iofc->ifgo)'
        elif op in ('Conv', 'ConvTranspose') and g.is_init(n.input[1]):
            mod = node_module(n.name)
            if mod is None or mod.startswith('decoder.generator.istft'):
                continue  # iSTFT basis: not a parameter in KModel
            put_weight(mod, g.arr(n.input[1]).astype(np.float32), f'{n.name}: {n.input[1]} (float)')
        elif op == 'MatMul' and any(g.is_init(x) for x in n.input):
            mod = node_module(n.name)
            w = g.arr(next(x for x in n.input if g.is_init(x))).astype(np.float32)
            put_weight(mod, w.T.copy(), f'{n.name} (float)')

    # Named float initializers: encoder.<part>.X -> <part>.X ; decoder.decoder.X -> decoder.X
    for name in g.inits:
        if g.inits[name].data_type != onnx.TensorProto.FLOAT:
            continue
        if name.startswith('decoder.decoder.'):
            key = 'decoder.' + name[len('decoder.decoder.'):]
        elif name.startswith('encoder.'):
            key = name[len('encoder.'):]
        else:
            continue
        if key in target and key not in out:
            out[key] = g.arr(name).astype(np.float32)
            sources[key] = f'{name} (float, by name)'

    # Resolve module weights: plain or weight-normed.
    zero_norm_channels: dict[str, int] = {}
    for mod, w in weights.items():
        if f'{mod}.weight' in target:
            out[f'{mod}.weight'] = w
        elif f'{mod}.weight_v' in target:
            norm = np.sqrt((w.astype(np.float64) ** 2).sum(axis=tuple(range(1, w.ndim)), keepdims=True))
            # Channels that dequantize to all zeros: v=0, g=0 would give 0/0 = NaN in torch's weight_norm.
            # Keep g=0 (effective weight 0) and give v any non-zero direction.
            dead = (norm == 0).reshape(-1)
            if dead.any():
                w = w.copy()
                w[dead] = 1.0
                zero_norm_channels[mod] = int(dead.sum())
            out[f'{mod}.weight_v'] = w
            out[f'{mod}.weight_g'] = norm.astype(np.float32)
            sources[f'{mod}.weight_v'] = sources[f'{mod}.weight'] + ' [weight_v=W]'
            sources[f'{mod}.weight_g'] = sources[f'{mod}.weight'] + ' [weight_g=||W||]'
        else:
            print(f'WARNING: no KModel key for ONNX weight of {mod} ({sources[mod + ".weight"]})')

    # Defaults for tensors the ONNX graph does not carry.
    defaults = []
    for key, ref in target.items():
        if key in out:
            continue
        if re.search(r'\.norm\.(weight|bias)$', key):      # AdaIN1d InstanceNorm affine: graph has none
            out[key] = np.ones(ref.shape, np.float32) if key.endswith('weight') else np.zeros(ref.shape, np.float32)
            defaults.append(key)
        elif key.startswith('bert.pooler.'):                # unused by KModel (last_hidden_state only)
            out[key] = np.zeros(ref.shape, np.float32)
            defaults.append(key)

    # Shape check, split into KModel parts.
    ckpt = {p: {} for p in PARTS}
    bad = []
    for key, arr in out.items():
        if key not in target:
            bad.append(f'extra {key} {arr.shape}')
            continue
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(target[key].dtype)
        if tuple(t.shape) != tuple(target[key].shape):
            bad.append(f'shape {key}: onnx {tuple(t.shape)} vs kmodel {tuple(target[key].shape)}')
            continue
        part, sub = key.split('.', 1)
        ckpt[part][sub] = t
    missing = [k for k in target if k not in out]
    if zero_norm_channels:
        print(f'weight-norm modules with all-zero output channels (v set to 1, g=0): {zero_norm_channels}')
    return ckpt, missing, defaults, bad, sources, target


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else MODEL
    dst = sys.argv[2] if len(sys.argv) > 2 else '/tmp/issue3/kmodel_state.pth'
    ckpt, missing, defaults, bad, sources, target = convert(path)
    torch.save(ckpt, dst)
    n_keys = sum(len(v) for v in ckpt.values())
    print(f'wrote {dst}: {n_keys}/{len(target)} KModel keys '
          f'({sum(t.numel() for v in ckpt.values() for t in v.values())} values)')
    for p in PARTS:
        print(f'  {p}: {len(ckpt[p])} keys')
    print(f'defaults (not in ONNX): {len(defaults)}: '
          f'{sum(1 for k in defaults if ".norm." in k)} InstanceNorm affine, '
          f'{sum(1 for k in defaults if "pooler" in k)} ALBERT pooler')
    print(f'unmapped KModel keys: {len(missing)}')
    for k in missing:
        print('  MISSING', k, tuple(target[k].shape))
    for b in bad:
        print('  PROBLEM', b)
    with open('/tmp/issue3/mapping.tsv', 'w') as f:
        for k in target:
            f.write(f'{k}\t{tuple(target[k].shape)}\t{sources.get(k, "default" if k in defaults else "MISSING")}\n')
    # Load check through KModel's own loader (strict).
    from kconfig import build_kmodel as bk
    m = bk(dst)
    for p in PARTS:
        getattr(m, p).load_state_dict(ckpt[p], strict=True)
    print('strict load_state_dict into KModel: OK')


if __name__ == '__main__':
    main()
