"""PyTorch weights for hexgrad's KModel (kokoro==0.9.4): the official ones from a directory, or weights
converted from the embedded int8 ONNX graph.

A user with the official files on disk (hexgrad/Kokoro-82M: config.json, kokoro-v1_0.pth, voices/*.pt)
names their directory in model.dir; `ModelDir` checks that layout and `load_official_kmodel` loads it.

Otherwise only the int8 ONNX model ships with speakd, and nothing may be fetched from a model hub, so the
torch checkpoint is rebuilt from the graph: int8 weights are dequantized as (q - zp)·scale and every tensor is
mapped to its KModel key by the name of the node that consumes it (most weights are anonymous in the
graph). The result reproduces the int8 model's weights, not the original fp32 Kokoro checkpoint.

Known gap between the two models on the same input:
- the ONNX graph's exported iSTFT returns 1.5x torch.istft, so its audio is 1.5x KModel's;
- ONNX Runtime also quantizes activations to int8 at run time, so raw durations differ by a few percent
  and a few tokens per sentence round to ±1 frame; the vocoders then differ by about int8 noise.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from speakd.server.engines.kokoro.assets import ModelFiles
from speakd.server.engines.kokoro.model_config import KMODEL_KEYS, kokoro_config
from speakd.server.engines.kokoro.modules import kokoro_module
from speakd.server.errors import ConfigError, DependencyError, ModelError

if TYPE_CHECKING:
    import onnx
    import torch
    from kokoro.model import KModel

logger = logging.getLogger(__name__)

PARTS = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
REPO_ID = "hexgrad/Kokoro-82M"  # names the model for KModel; nothing is downloaded from it
CHECKPOINT_NAME = "kmodel.pth"
ONNX_AUDIO_GAIN = 1.5  # ONNX audio / KModel audio for the same spectrum (its exported iSTFT)
# The official layout (hexgrad/Kokoro-82M), whose checkpoint was saved from nn.DataParallel: its state
# dict keys carry the wrapper's "module." prefix.
OFFICIAL_CONFIG = "config.json"
OFFICIAL_CHECKPOINT = "kokoro-v1_0.pth"
OFFICIAL_VOICES = "voices"
MODULE_PREFIX = "module."

F32 = npt.NDArray[np.float32]


def _kmodel_class() -> Any:
    """KModel, imported only when torch weights are wanted: torch is heavy and the ONNX engine needs none."""
    return kokoro_module("model").KModel


def _bare_kmodel(config: dict[str, Any]) -> KModel:
    """A randomly initialised KModel from `config`: KModel reads weights from a file or the hub, so give
    it none."""
    kmodel_class = _kmodel_class()
    import torch

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with warnings.catch_warnings():
        # kokoro's own construction warns (LSTM dropout with one layer, deprecated weight_norm): not ours.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return kmodel_class(repo_id=REPO_ID, config=config, model=empty)


@dataclass(frozen=True, slots=True)
class ModelDir:
    """The official Kokoro-82M files in a directory, checked without loading a tensor, so that a wrong
    directory is reported before anything heavy starts (the daemon checks it with its configuration)."""

    root: Path
    config: dict[str, Any]  # config.json, with every key of KMODEL_KEYS
    checkpoint: Path
    voices: dict[str, Path]  # voice name (the file's stem) → voices/NAME.pt, sorted by name

    @property
    def vocab(self) -> dict[str, int]:
        """Phoneme symbol → token id, from config.json."""
        vocab: dict[str, int] = self.config["vocab"]
        return vocab

    @classmethod
    def open(cls, root: Path) -> ModelDir:
        """Raises ConfigError if `root` is no directory, ModelError if it lacks a file or config.json
        does not parse or lacks a key KModel reads."""
        if not root.is_dir():
            raise ConfigError(f"model.dir {root} does not exist or is not a directory")
        layout = f"expected: {OFFICIAL_CONFIG}, {OFFICIAL_CHECKPOINT}, {OFFICIAL_VOICES}/*.pt as in {REPO_ID}"
        config_path = root / OFFICIAL_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"{root} has no {OFFICIAL_CONFIG} ({layout})") from exc
        except OSError as exc:
            raise ModelError(f"cannot read {config_path}: {exc.strerror or exc}") from exc
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ModelError(f"{config_path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ModelError(f"{config_path} holds a JSON {type(config).__name__}, not an object")
        missing = [key for key in KMODEL_KEYS if key not in config]
        if missing:
            raise ModelError(f"{config_path} lacks keys KModel needs: {', '.join(missing)}")
        vocab = config["vocab"]
        if not isinstance(vocab, dict) or not all(type(token) is int for token in vocab.values()):
            raise ModelError(f"{config_path}: vocab must map phoneme symbols to integer token ids")
        checkpoint = root / OFFICIAL_CHECKPOINT
        if not checkpoint.is_file():
            raise ModelError(f"{root} has no {OFFICIAL_CHECKPOINT} ({layout})")
        voice_files = sorted(path for path in (root / OFFICIAL_VOICES).glob("*.pt") if path.is_file())
        if not voice_files:
            raise ModelError(f"{root / OFFICIAL_VOICES} holds no voice files (*.pt) ({layout})")
        return cls(root, config, checkpoint, {path.stem: path for path in voice_files})


class _Graph:
    """The ONNX graph indexed by tensor name: initializers, and the nodes producing and consuming each."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self._initializers = {tensor.name: tensor for tensor in model.graph.initializer}
        self._producer = {out: node for node in self.nodes for out in node.output}
        self._consumers: defaultdict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self._consumers[name].append(node)

    def is_initializer(self, name: str) -> bool:
        return name in self._initializers

    def array(self, name: str) -> F32:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._initializers[name]).astype(np.float32)

    def float_initializers(self) -> list[str]:
        from onnx import TensorProto

        return [name for name, t in self._initializers.items() if t.data_type == TensorProto.FLOAT]

    def producer(self, name: str) -> onnx.NodeProto | None:
        return self._producer.get(name)

    def zero_point(self, node: onnx.NodeProto, index: int) -> F32 | float:
        """Read from the node's input: the exporter shares identical zero points between unrelated layers."""
        has = len(node.input) > index and node.input[index]
        return self.array(node.input[index]) if has else 0.0

    def weight_scale(self, node: onnx.NodeProto) -> F32:
        """The weight scale of a ConvInteger/MatMulInteger: the constant factor of Mul(x_scale, w_scale)
        that rescales the node's integer output, a few ops (bias Add, Cast) downstream."""
        tensor = node.output[0]
        for _ in range(4):
            consumers = self._consumers[tensor]
            if len(consumers) != 1:
                break
            (consumer,) = consumers
            if consumer.op_type == "Mul":
                other = consumer.input[1] if consumer.input[0] == tensor else consumer.input[0]
                product = self._producer.get(other)
                constants = [x for x in product.input if self.is_initializer(x)] if product else []
                if product is None or product.op_type != "Mul" or len(constants) != 1:
                    break
                return self.array(constants[0])
            tensor = consumer.output[0]
        raise ModelError(f"no weight scale found after ONNX node {node.name}")


def _module_path(node_name: str) -> str | None:
    """ONNX node name → KModel module path by the exporter's scopes, e.g.
    '/decoder/decoder/generator/ups.0/ConvTranspose' → 'decoder.generator.ups.0'; None outside KModel."""
    scopes = node_name.strip("/").split("/")[:-1]
    if len(scopes) < 2:
        return None
    if scopes[:2] == ["decoder", "decoder"]:
        scopes = ["decoder", *scopes[2:]]
    elif scopes[0] == "encoder":
        # /encoder/F0.0, /encoder/shared, /encoder/F0_proj...: the exporter dropped the predictor scope.
        scopes = scopes[1:] if scopes[1] in PARTS else ["predictor", *scopes[1:]]
    else:
        return None
    path = []
    for i, scope in enumerate(scopes):
        # Nested nn.Sequential scopes repeat the prefix: /cnn.0/cnn.0.0/ is module cnn.0.0.
        if i + 1 < len(scopes) and scopes[i + 1].startswith(scope + "."):
            continue
        if scopes[0] == "bert":
            # ALBERT runs one shared layer 12 times; its calls are named query, query_1 … query_11.
            scope = re.sub(r"_\d+$", "", scope)
        path.append(scope)
    return ".".join(path)


def _lstm_gates(weight: F32, hidden: int) -> F32:
    """Gate blocks along axis 0 from ONNX's order i,o,f,c to torch's i,f,g(=c),o."""
    i, o, f, c = (weight[k * hidden : (k + 1) * hidden] for k in range(4))
    return np.concatenate([i, f, c, o], axis=0)


def _collect_weights(graph: _Graph) -> tuple[dict[str, F32], dict[str, F32]]:
    """Weights held by the graph's nodes: (folded weight per module path, LSTM tensors per full key)."""
    from onnx import helper

    modules: dict[str, F32] = {}
    lstm: dict[str, F32] = {}

    def put(node_name: str, weight: F32) -> None:
        module = _module_path(node_name)
        if module is None:
            raise ModelError(f"ONNX node {node_name} holds a weight outside KModel's parts")
        if module in modules and not np.array_equal(modules[module], weight):
            raise ModelError(f"{module} gets two different weights in the ONNX graph (last: {node_name})")
        modules[module] = weight

    for node in graph.nodes:
        op = node.op_type
        if op == "MatMulInteger" and graph.is_initializer(node.input[1]):
            # int8 [in, out] with a zero point and scale per output column.
            q = graph.array(node.input[1])
            put(node.name, ((q - graph.zero_point(node, 3)) * graph.weight_scale(node)).T.copy())
        elif op == "ConvInteger":
            # uint8 [out, in, k] with one zero point and scale for the whole tensor.
            q = graph.array(node.input[1])
            put(node.name, (q - graph.zero_point(node, 3)) * graph.weight_scale(node))
        elif op == "DequantizeLinear":
            gather = graph.producer(node.input[0])
            if gather is not None and gather.op_type == "Gather" and graph.is_initializer(gather.input[0]):
                q = graph.array(gather.input[0])  # int8 embedding table
                put(gather.name, (q - graph.zero_point(node, 2)) * graph.array(node.input[1]))
        elif op == "DynamicQuantizeLSTM":
            module = _module_path(node.name)
            hidden = next(
                int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "hidden_size"
            )
            w, r, b = (graph.array(x) for x in node.input[1:4])  # [dir, in, 4H], [dir, H, 4H], [dir, 8H]
            w_scale, w_zero, r_scale, r_zero = (graph.array(x) for x in node.input[8:12])
            for d, suffix in enumerate(("l0", "l0_reverse")):
                lstm[f"{module}.weight_ih_{suffix}"] = _lstm_gates(
                    ((w[d] - w_zero[d]) * w_scale[d]).T, hidden
                )
                lstm[f"{module}.weight_hh_{suffix}"] = _lstm_gates(
                    ((r[d] - r_zero[d]) * r_scale[d]).T, hidden
                )
                lstm[f"{module}.bias_ih_{suffix}"] = _lstm_gates(b[d, : 4 * hidden], hidden)
                lstm[f"{module}.bias_hh_{suffix}"] = _lstm_gates(b[d, 4 * hidden :], hidden)
        elif op in ("Conv", "ConvTranspose") and graph.is_initializer(node.input[1]):
            # Float convolutions; the iSTFT basis is a graph constant, not a KModel parameter.
            if not node.name.startswith("/decoder/decoder/generator/istft"):
                put(node.name, graph.array(node.input[1]))
        elif op == "MatMul":
            constants = [x for x in node.input if graph.is_initializer(x)]
            if constants:
                put(node.name, graph.array(constants[0]).T.copy())
    return modules, lstm


def _weight_norm(weight: F32) -> tuple[F32, F32]:
    """(weight_v, weight_g) for torch's weight_norm(dim=0) giving back the folded weight.

    Some output channels dequantize to all zeros; v=0, g=0 would make weight_norm compute 0/0 = NaN,
    so those get v=1 and g=0 (still a zero weight)."""
    norm = np.sqrt((weight.astype(np.float64) ** 2).sum(axis=tuple(range(1, weight.ndim)), keepdims=True))
    dead = norm.reshape(-1) == 0
    if dead.any():
        weight = weight.copy()
        weight[dead] = 1.0
    return weight, norm.astype(np.float32)


def convert_onnx(onnx_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The Kokoro int8 ONNX graph as a KModel checkpoint: {part: state dict} for the parts in PARTS.

    Strict: raises ModelError if any KModel key is left unmapped, any graph weight has no KModel key,
    or any shape differs."""
    _kmodel_class()  # torch comes with kokoro: fail with kokoro's install hint
    import torch

    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:
        raise DependencyError("the Python package 'onnx' is missing: pip install onnx") from exc
    try:
        model = onnx.load(str(onnx_path))
    except (OSError, DecodeError) as exc:
        raise ModelError(f"cannot read the ONNX model {onnx_path}: {exc}") from exc
    graph = _Graph(model)
    target = {key: tuple(t.shape) for key, t in _bare_kmodel(kokoro_config({})).state_dict().items()}
    modules, tensors = _collect_weights(graph)

    # Biases, norms and Snake alphas kept their torch names: encoder.<part>.X and decoder.decoder.X.
    for name in graph.float_initializers():
        key = name.removeprefix("decoder.") if name.startswith("decoder.decoder.") else name
        key = key.removeprefix("encoder.")
        if key != name and key in target:
            tensors.setdefault(key, graph.array(name))

    # The graph holds folded weights; weight-normed modules need them split.
    unknown = []
    for module, weight in modules.items():
        if f"{module}.weight" in target:
            tensors[f"{module}.weight"] = weight
        elif f"{module}.weight_v" in target:
            tensors[f"{module}.weight_v"], tensors[f"{module}.weight_g"] = _weight_norm(weight)
        else:
            unknown.append(module)

    # Not in the graph: the InstanceNorm affine of AdaIN (the export decomposes a plain one) and the
    # ALBERT pooler (KModel uses only the last hidden state).
    defaults = 0
    for key, shape in target.items():
        if key not in tensors and re.search(r"\.norm\.(weight|bias)$|^bert\.pooler\.", key):
            fill = 1.0 if key.endswith(".norm.weight") else 0.0
            tensors[key] = np.full(shape, fill, dtype=np.float32)
            defaults += 1

    unknown += [key for key in tensors if key not in target]
    missing = [key for key in target if key not in tensors]
    mismatched = [
        f"{key} {tensors[key].shape} ≠ {shape}"
        for key, shape in target.items()
        if key in tensors and tensors[key].shape != shape
    ]
    problems = (
        ("unmapped KModel keys", missing),
        ("graph weights without a KModel key", unknown),
        ("shape mismatches", mismatched),
    )
    report = "; ".join(f"{what}: {', '.join(items[:8])}" for what, items in problems if items)
    if report:
        raise ModelError(f"{onnx_path} does not map onto kokoro's KModel: {report}")
    logger.info("mapped %d KModel tensors from %s (%d defaults)", len(tensors), onnx_path, defaults)

    checkpoint: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key in target:
        part, name = key.split(".", 1)
        checkpoint[part][name] = torch.from_numpy(np.ascontiguousarray(tensors[key], dtype=np.float32))
    return checkpoint


def prepare_torch_weights(files: ModelFiles) -> Path:
    """The cached KModel checkpoint next to the ONNX model, converted on first use (~10 s).

    The folder name carries the ONNX model's sha, so a cached file always matches its graph."""
    target = files.whole.parent / CHECKPOINT_NAME
    if target.is_file():
        return target
    logger.info("converting %s into PyTorch weights at %s", files.whole, target)
    checkpoint = convert_onnx(files.whole)
    import torch

    # Per-process temporary name and rename, so concurrent daemons never see half a file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _read_checkpoint(path: Path, hint: str = "", mmap: bool = False) -> object:
    """torch.load with tensors only (no code from the file runs); ModelError if it does not read."""
    import torch

    try:
        checkpoint: object = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"cannot read the checkpoint {path} ({exc}){hint}") from exc
    return checkpoint


def _fit(model: KModel, checkpoint: object, source: Path, hint: str = "") -> None:
    """Load `checkpoint`, {part: state dict}, into `model` strictly, else raise a ModelError naming each
    part's missing, unexpected and misshapen keys. KModel's own loader would instead fall back to a
    partial, non-strict load without a word. Keys may carry the "module." prefix."""
    import torch

    if not isinstance(checkpoint, dict):
        raise ModelError(f"{source} holds a {type(checkpoint).__name__}, not {{part: state dict}}{hint}")
    problems = [f"unknown part {part!r}" for part in checkpoint if part not in PARTS]
    states: dict[str, dict[str, torch.Tensor]] = {}
    for part in PARTS:
        given = checkpoint.get(part)
        if not isinstance(given, dict):
            problems.append(f"part {part!r} is {'missing' if given is None else 'not a state dict'}")
            continue
        state = {str(key).removeprefix(MODULE_PREFIX): value for key, value in given.items()}
        expected = getattr(model, part).state_dict()
        misshapen = [
            f"{key} {list(getattr(state[key], 'shape', []))} ≠ {list(tensor.shape)}"
            for key, tensor in expected.items()
            if key in state and (not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape)
        ]
        for what, keys in (
            ("missing keys", [key for key in expected if key not in state]),
            ("unexpected keys", [key for key in state if key not in expected]),
            ("shape mismatches", misshapen),
        ):
            if keys:
                more = f", … ({len(keys)} in all)" if len(keys) > 5 else ""
                problems.append(f"{part}: {what} {', '.join(keys[:5])}{more}")
        states[part] = state
    if problems:
        raise ModelError(f"{source} does not fit kokoro's KModel: {'; '.join(problems)}{hint}")
    for part, state in states.items():
        getattr(model, part).load_state_dict(state, strict=True)


def load_kmodel(files: ModelFiles, device: str = "cpu") -> KModel:
    """KModel in eval mode on `device` with the converted weights, built offline.

    Its audio is 1/ONNX_AUDIO_GAIN of the ONNX engine's, and its durations may differ by ±1 frame on a
    few tokens (see the module docstring)."""
    path = prepare_torch_weights(files)
    model = _bare_kmodel(kokoro_config(files.vocab()))
    hint = "; delete it to convert again"
    _fit(model, _read_checkpoint(path, hint, mmap=True), path, hint)
    return model.to(device).eval()


def load_official_kmodel(model_dir: ModelDir, device: str = "cpu") -> KModel:
    """KModel in eval mode on `device` with the official weights in `model_dir`, built offline from its
    config.json and loaded strictly. Its audio is KModel's own level, as with the converted weights."""
    logger.info("loading the official Kokoro weights %s", model_dir.checkpoint)
    checkpoint = _read_checkpoint(model_dir.checkpoint)  # first: an unreadable file fails fast
    try:
        model = _bare_kmodel(model_dir.config)
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelError(f"{model_dir.root / OFFICIAL_CONFIG} does not describe a KModel ({exc!r})") from exc
    _fit(model, checkpoint, model_dir.checkpoint)
    return model.to(device).eval()
