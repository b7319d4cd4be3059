r"""The quantized model on disk: packed integer weights and their grids, no pickle.

File layout (all integers little-endian)::

    b"FQPTQ\x00v1"             8-byte magic with the format version
    uint32 L                   length of the header
    L bytes                    header, UTF-8 JSON (below)
    payload                    the blobs the header points at, back to back

Header: ``{"model": "cnn" | "resnet", "layers": [...], "float": [...]}``. Each layer,
in the network's module order: ``name``, ``shape`` (the weight's), ``weight_bits``,
``codes`` (the uint8 codes packed densely at ``weight_bits`` with
:func:`fedquant.packing.pack_codes`), ``scale`` (float32 per output channel),
``zero_point`` (packed at ``weight_bits``), ``bias`` (float32, or null) and ``input``
(null for a float input, else ``{"bits", "step" (float32), "zero_point"}``). Each blob
reference is ``[offset, length]`` into the payload. ``float`` lists the model's other
tensors (GroupNorm's affine parameters) as ``{"name", "shape", "data"}`` float32 blobs.

Loading rebuilds the model class from its name (:func:`fedquant.models.build_model`,
which sets the conv geometry), swaps in PTQLayers with the stored codes, grids and input
quantizers, and loads the float tensors; the dequantized weights are computed by the same
function as in :func:`fedquant.ptq.quantize_model`, so outputs are bit-identical. A file
is untrusted input: anything malformed raises :class:`PTQFileError` naming what.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from fedquant.config import ModelName
from fedquant.files import write_atomically
from fedquant.models import build_model
from fedquant.packing import pack_codes, packed_size, unpack_codes
from fedquant.ptq.layers import PTQLayer, PTQModel, conv_geometry, ptq_layers
from fedquant.ptq.quantizers import ActivationQuantizer, max_code
from fedquant.ptq.result import PTQResult

__all__ = ["MAGIC", "PTQFileError", "decode_quantized", "encode_quantized", "load_quantized"]
__all__ += ["save_quantized"]

MAGIC = b"FQPTQ\x00v1"
_LENGTH = struct.Struct("<I")
_MAX_HEADER = 1 << 24


class PTQFileError(ValueError):
    """A quantized-model file is malformed, truncated, or for a different model."""


class _Blobs:
    """The payload being written: blobs appended, each referenced by [offset, length]."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        ref = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return ref

    def float32(self, tensor: torch.Tensor) -> list[int]:
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        return self.add(array.astype("<f4", copy=False).tobytes())


def _quantized_model(model: nn.Module) -> PTQModel:
    if not isinstance(model, PTQModel):
        raise ValueError(f"`model` must be a PTQModel. Found `{type(model).__name__}`.")
    return model


def encode_quantized(model: nn.Module) -> bytes:
    """The file's bytes for a :class:`PTQModel` (module docstring)."""
    quantized = _quantized_model(model)
    blobs = _Blobs()
    layers: list[dict[str, Any]] = []
    prefixes = []
    for name, layer in ptq_layers(quantized.network):
        prefixes.append(name + ".")
        bits = layer.weight_bits
        quantizer = layer.input_quantizer
        layers.append(
            {
                "name": name,
                "shape": list(layer.codes.shape),
                "weight_bits": bits,
                "codes": blobs.add(pack_codes(layer.codes, bits=bits)),
                "scale": blobs.float32(layer.weight_scale),
                "zero_point": blobs.add(
                    pack_codes(layer.weight_zero_point.to(torch.uint8), bits=bits)
                ),
                "bias": None if layer.bias is None else blobs.float32(layer.bias),
                "input": None
                if quantizer is None
                else {
                    "bits": quantizer.bits,
                    "step": blobs.float32(quantizer.step.reshape(1)),
                    "zero_point": int(quantizer.zero_point.item()),
                },
            }
        )
    floats = [
        {"name": key, "shape": list(value.shape), "data": blobs.float32(value)}
        for key, value in quantized.network.state_dict().items()
        if not any(key.startswith(p) for p in prefixes)
    ]
    header = json.dumps(
        {"model": quantized.model_name.value, "layers": layers, "float": floats},
        separators=(",", ":"),
    ).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *blobs.parts])


def save_quantized(result: PTQResult, path: str | Path) -> int:
    """Write ``result.model`` to ``path`` atomically (``fedquant.files``).

    Returns:
        The number of bytes written (``result.packed_bytes``).
    """
    data = encode_quantized(result.model)

    def write(f: BinaryIO) -> None:
        f.write(data)

    write_atomically(path, write)
    return len(data)


def load_quantized(path: str | Path) -> nn.Module:
    """The :class:`PTQModel` stored at ``path``; :class:`PTQFileError` if malformed."""
    return decode_quantized(Path(path).read_bytes())


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise PTQFileError(f"quantized-model file: {what}")


def _field(entry: object, key: str, kind: type | tuple[type, ...]) -> Any:
    _require(isinstance(entry, dict) and key in entry, f"missing `{key}`")
    value = entry[key]  # type: ignore[index]
    _require(
        isinstance(value, kind) and not isinstance(value, bool),
        f"`{key}` must be {kind}, got {value!r}",
    )
    return value


class _Payload:
    """Blob references checked against the payload's bounds."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def blob(self, ref: object, length: int, what: str) -> bytes:
        _require(
            isinstance(ref, list)
            and len(ref) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in ref),
            f"{what}: a blob reference must be [offset, length], got {ref!r}",
        )
        offset, size = int(ref[0]), int(ref[1])  # type: ignore[index]
        _require(size == length, f"{what}: {size} bytes, expected {length}")
        _require(0 <= offset and offset + size <= len(self.data), f"{what}: out of bounds")
        return self.data[offset : offset + size]

    def float32(self, ref: object, shape: tuple[int, ...], what: str) -> torch.Tensor:
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(self.blob(ref, 4 * count, what), dtype="<f4").astype(np.float32)
        _require(bool(np.isfinite(array).all()), f"{what}: not finite")
        return torch.from_numpy(array.reshape(shape))

    def codes(self, ref: object, bits: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
        count = int(np.prod(shape, dtype=np.int64))
        data = self.blob(ref, packed_size(count, bits=bits), what)
        return torch.from_numpy(unpack_codes(data, bits=bits, count=count).reshape(shape))


def _split(data: bytes) -> tuple[dict[str, Any], _Payload]:
    _require(data[: len(MAGIC)] == MAGIC, "not a fedquant PTQ file (magic)")
    start = len(MAGIC) + _LENGTH.size
    _require(len(data) >= start, "truncated")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    _require(length <= _MAX_HEADER and start + length <= len(data), "truncated header")
    try:
        header = json.loads(data[start : start + length].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PTQFileError(f"quantized-model file: header is not JSON ({e})") from e
    _require(isinstance(header, dict), "header must be an object")
    return header, _Payload(data[start + length :])


def _bits(value: object, what: str) -> int:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 8,
        f"{what} must be 2..8, got {value!r}",
    )
    return value  # type: ignore[return-value]


def _layer(entry: object, source: nn.Module, payload: _Payload) -> PTQLayer:
    name = _field(entry, "name", str)
    if not isinstance(source, nn.Conv2d | nn.Linear):
        raise PTQFileError(f"quantized-model file: {name} is not a conv/linear layer")
    shape = tuple(source.weight.shape)
    _require(tuple(_field(entry, "shape", list)) == shape, f"{name}: weight shape is not {shape}")
    bits = _bits(_field(entry, "weight_bits", int), f"{name}.weight_bits")
    channels = shape[0]
    codes = payload.codes(_field(entry, "codes", list), bits, shape, f"{name}.codes")
    scale = payload.float32(_field(entry, "scale", list), (channels,), f"{name}.scale")
    _require(bool((scale > 0).all()), f"{name}.scale must be positive")
    zero_point = payload.codes(
        _field(entry, "zero_point", list), bits, (channels,), f"{name}.zero_point"
    )
    bias_ref = _field(entry, "bias", (list, type(None)))
    _require((bias_ref is None) == (source.bias is None), f"{name}: bias present or not")
    bias = None if bias_ref is None else payload.float32(bias_ref, (channels,), f"{name}.bias")
    layer = PTQLayer(
        codes=codes,
        weight_scale=scale,
        weight_zero_point=zero_point.to(torch.float32),
        weight_bits=bits,
        bias=bias,
        conv=conv_geometry(source),
    )
    layer.float_weight = None
    spec = _field(entry, "input", (dict, type(None)))
    if spec is not None:
        act_bits = _bits(_field(spec, "bits", int), f"{name}.input.bits")
        step = float(payload.float32(_field(spec, "step", list), (1,), f"{name}.input.step"))
        act_zero = _field(spec, "zero_point", int)
        _require(step > 0 and 0 <= act_zero <= max_code(act_bits), f"{name}: bad input grid")
        layer.input_quantizer = ActivationQuantizer(
            bits=act_bits, step=step, zero_point=float(act_zero)
        )
    return layer


def decode_quantized(data: bytes) -> PTQModel:
    """The :class:`PTQModel` of a file's bytes; :class:`PTQFileError` if malformed."""
    header, payload = _split(data)
    model_value = _field(header, "model", str)
    _require(model_value in {m.value for m in ModelName}, f"unknown model {model_value!r}")
    name = ModelName(model_value)
    network = build_model(name, seed=0).eval()
    entries = _field(header, "layers", list)
    expected = [n for n, m in network.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    names = [_field(e, "name", str) for e in entries]
    _require(names == expected, f"layers {names} are not the {name.value}'s {expected}")
    for entry, layer_name in zip(entries, names, strict=True):
        network.set_submodule(layer_name, _layer(entry, network.get_submodule(layer_name), payload))
    state = network.state_dict()
    prefixes = tuple(n + "." for n in names)
    wanted = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(prefixes)}
    floats = _field(header, "float", list)
    loaded: dict[str, torch.Tensor] = {}
    for entry in floats:
        key = _field(entry, "name", str)
        _require(key in wanted and key not in loaded, f"unexpected float tensor {key!r}")
        shape = wanted[key]
        _require(tuple(_field(entry, "shape", list)) == shape, f"{key}: shape is not {shape}")
        loaded[key] = payload.float32(_field(entry, "data", list), shape, key)
    missing = sorted(set(wanted) - set(loaded))
    _require(not missing, f"missing float tensors {missing}")
    network.load_state_dict(loaded, strict=False)
    network.requires_grad_(False)
    return PTQModel(network, model_name=name)
