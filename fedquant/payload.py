"""The payload codec: a model update <-> Flower records.

This module and :mod:`fedquant.reply` (the whole reply around the update: record keys,
metrics, status replies) are the only ones in ``fedquant`` that import Flower. A client
encodes its update (a mapping of tensor name to float tensor) into a
:class:`flwr.app.RecordDict`; the server decodes the reply, which is untrusted input, and
validates every field before any of it is used.

Reply layout (paper B, Bozorgasl & Chen 2024, "What is sent": per-tensor codes plus
the clip threshold ``s`` and the quantization error):

- ``content[CODES_KEY]``: an :class:`~flwr.app.ArrayRecord` mapping each tensor name
  to ``Array(dtype="bitpacked", shape=<tensor shape>, stype=PACKED_STYPE,
  data=<codes packed at `bits` bits per code>)``. The bytes are raw packed codes
  (``fedquant.packing``), with no numpy header and never pickled. With ``bits == 32``
  (unquantized mode) the entry is a plain float32 ``Array(ndarray)`` instead
  (``stype == "numpy.ndarray"``, ``np.save`` format).
- ``content[META_KEY]``: a :class:`~flwr.app.ConfigRecord` with, per tensor,
  ``f"{name}/bits"`` (int), ``f"{name}/clip"`` (float ``s``) and ``f"{name}/mse"``
  (float, mean squared quantization error). ``/`` never occurs in a PyTorch
  ``state_dict`` name (those use ``.``), and the field is split off at the *last*
  ``/``, so any tensor name round-trips.

Decoding is strict: every problem raises :class:`PayloadError`, naming the tensor
and the field, and no other exception type escapes :func:`decode_update`.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedquant.codec import ClipRule, Rounding, dequantize, quantize
from fedquant.config import MAX_CODE_BITS, UNQUANTIZED_BITS, ConfigError, check_bits
from fedquant.packing import pack_codes, packed_size, unpack_codes

__all__ = [
    "CODES_KEY",
    "FLOAT_BITS",
    "FLOAT_STYPE",
    "MAX_ELEMENTS",
    "MAX_MSE",
    "MAX_NDIM",
    "META_FIELDS",
    "META_KEY",
    "META_SEP",
    "PACKED_DTYPE",
    "PACKED_STYPE",
    "DecodedTensor",
    "PayloadError",
    "decode_update",
    "encode_update",
    "serialized_size",
]

CODES_KEY = "codes"
"""RecordDict key of the ArrayRecord holding one Array per tensor."""
META_KEY = "quant"
"""RecordDict key of the ConfigRecord holding the per-tensor bits, clip and mse."""
PACKED_STYPE = "fedquant.bitpacked.v1"
"""``Array.stype`` of bit-packed codes (raw bytes, ``fedquant.packing`` layout)."""
PACKED_DTYPE = "bitpacked"
"""``Array.dtype`` of bit-packed codes."""
FLOAT_STYPE = "numpy.ndarray"
"""``Array.stype`` Flower gives an ``Array(ndarray)`` (``np.save`` bytes)."""
FLOAT_BITS = UNQUANTIZED_BITS
"""``bits`` value of the unquantized mode (float32 values, clip 0, mse 0)."""
META_SEP = "/"
"""Separator between tensor name and field in ``META_KEY`` keys."""
META_FIELDS = ("bits", "clip", "mse")
"""Fields every tensor carries in the ``META_KEY`` record."""
MAX_NDIM = 32
"""Most dimensions a decoded tensor may declare (numpy allows 64)."""
MAX_ELEMENTS = 2**31 - 1
"""Most elements a decoded tensor, or any one of its dimensions, may declare."""
MAX_MSE = (2.0 * float(np.finfo(np.float32).max)) ** 2
"""Largest ``mse`` a tensor may declare (about 4.6e77): a float32 value and its
float32 reconstruction differ by less than twice the float32 maximum. A larger claim
is impossible, and summing a few of them would overflow the round's metrics."""

_FLOAT32 = np.dtype(np.float32)


class PayloadError(ValueError):
    """A client reply that does not decode: names the tensor and the field.

    ``str(err)`` reads ``"tensor 'fc.weight', field 'clip': must be finite and >= 0,
    got nan"``; ``tensor`` is ``None`` for problems with the reply as a whole
    (e.g. a missing record).
    """

    def __init__(self, *, tensor: str | None, field: str, reason: str) -> None:
        self.tensor = tensor
        self.field = field
        self.reason = reason
        where = f"field {field!r}" if tensor is None else f"tensor {tensor!r}, field {field!r}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Keyword-only __init__: pickle (e.g. across Ray workers) needs this.
        rebuild = functools.partial(
            type(self), tensor=self.tensor, field=self.field, reason=self.reason
        )
        return rebuild, ()


@dataclass(frozen=True)
class DecodedTensor:
    """One validated, dequantized tensor of a reply.

    ``values`` is float32 with the declared shape: ``s * (2c/n - 1)``, n = 2^bits - 1
    (paper B, quantizer), or the float32 values themselves when ``bits == 32``.
    """

    values: np.ndarray
    bits: int
    clip: float
    mse: float


# ----------------------------------------------------------------------------- encode


def encode_update(
    update: Mapping[str, torch.Tensor],
    *,
    bits: int,
    clip: ClipRule = ClipRule.OCTAV,
    rounding: Rounding = Rounding.STOCHASTIC,
    generator: torch.Generator | None = None,
) -> RecordDict:
    """Quantize each tensor of ``update`` and pack it into a reply ``RecordDict``.

    With ``bits`` in 1..8 every tensor goes through
    ``fedquant.codec.quantize(t, bits=bits, clip=clip, rounding=rounding,
    generator=generator)`` (paper B: clip to ``[-s, s]``, ``c = floor(n*y + u)``
    or ``round(n*y)``) and its codes are bit-packed. With ``bits == 32`` each tensor
    is sent as float32 (clip 0, mse 0). Stochastic rounding needs ``generator``
    (``quantize`` enforces it). Tensors are encoded in ``update``'s order.

    Raises:
        ValueError: ``bits`` not in 1..8 or 32 (``fedquant.config.check_bits``), a
            tensor that is not floating point.
        TypeError: a value that is not a ``torch.Tensor`` or a key that is not a str.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"`bits` must be an int, got {bits!r}")
    check_bits(bits)  # ConfigError (a ValueError) naming `bits`
    if not isinstance(clip, ClipRule):
        raise TypeError(f"`clip` must be a ClipRule, got {clip!r}")
    if not isinstance(rounding, Rounding):
        raise TypeError(f"`rounding` must be a Rounding, got {rounding!r}")

    codes = ArrayRecord()
    meta = ConfigRecord()
    for name, tensor in update.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(tensor)}")
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} must be floating point, got {tensor.dtype}")
        shape = tuple(int(d) for d in tensor.shape)
        if bits == FLOAT_BITS:
            values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
            codes[name] = Array(values.numpy())
            clip_value, mse = 0.0, 0.0
        else:
            q = quantize(
                tensor.detach(), bits=bits, clip=clip, rounding=rounding, generator=generator
            )
            data = pack_codes(q.codes.reshape(-1).cpu(), bits=bits)
            codes[name] = Array(dtype=PACKED_DTYPE, shape=shape, stype=PACKED_STYPE, data=data)
            clip_value, mse = float(q.clip), float(q.mse)
        meta[_meta_key(name, "bits")] = bits
        meta[_meta_key(name, "clip")] = clip_value
        meta[_meta_key(name, "mse")] = mse
    return RecordDict({CODES_KEY: codes, META_KEY: meta})


def serialized_size(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serializes it (``RecordDict`` protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())


# ----------------------------------------------------------------------------- decode


def decode_update(
    content: RecordDict,
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_clip: float = 1e6,
) -> dict[str, DecodedTensor]:
    """Validate and dequantize a reply produced by :func:`encode_update`.

    ``content`` is untrusted. Checked, in order: both records present and of the
    right type; the tensor names in the codes record, in the metadata and in
    ``expected`` (when given) agree; every tensor has exactly the fields
    ``bits`` (int, not bool, in 1..8 or 32), ``clip`` (finite, ``0 <= s <=
    max_clip``) and ``mse`` (``0 <= mse <= MAX_MSE``); ``clip`` and ``mse`` may be sent as
    int (not bool) and are read as float; ``bits == 32`` requires clip and mse 0.
    Then per Array: stype and dtype; the shape (a sequence of non-negative ints, at
    most ``MAX_NDIM`` dims, each dim and the element count at most ``MAX_ELEMENTS``,
    equal to ``expected[name]`` when given); and the byte count, which must equal
    ``packed_size(prod(shape), bits)`` exactly. Float32 entries have their ``.npy``
    header parsed without allocating (dtype float32, the same shape, exactly the
    right number of bytes) and must hold finite values.

    Returns:
        ``{name: DecodedTensor}`` in the order of the codes record.

    Raises:
        PayloadError: any of the above, naming the tensor and the field
            (``"codes"``, ``"stype"``, ``"dtype"``, ``"shape"``, ``"data"``,
            ``"bits"``, ``"clip"``, ``"mse"``; or the record key when a record is
            missing).
        ValueError: ``max_clip`` not finite and > 0 (a caller error, not a reply's).
    """
    if not (isinstance(max_clip, int | float) and math.isfinite(max_clip) and max_clip > 0):
        raise ValueError(f"`max_clip` must be finite and > 0, got {max_clip!r}")
    expected_shapes = None
    if expected is not None:
        expected_shapes = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}

    codes, meta = _records(content)
    names = list(codes.keys())
    if expected_shapes is not None:
        for name in names:
            if name not in expected_shapes:
                raise PayloadError(tensor=name, field=CODES_KEY, reason="unexpected tensor")
        for name in expected_shapes:
            if name not in codes:
                raise PayloadError(tensor=name, field=CODES_KEY, reason="missing tensor")
    fields = _split_meta(meta, set(names))

    decoded: dict[str, DecodedTensor] = {}
    for name in names:
        bits, clip, mse = _check_meta(name, fields[name], max_clip=max_clip)
        want = None if expected_shapes is None else expected_shapes[name]
        values = _decode_array(name, codes[name], bits=bits, clip=clip, expected=want)
        decoded[name] = DecodedTensor(values=values, bits=bits, clip=clip, mse=mse)
    return decoded


def _meta_key(name: str, field: str) -> str:
    return f"{name}{META_SEP}{field}"


def _records(content: object) -> tuple[ArrayRecord, ConfigRecord]:
    if not isinstance(content, RecordDict):
        got = type(content).__name__
        raise PayloadError(tensor=None, field="content", reason=f"must be a RecordDict, got {got}")
    for key, kind in ((CODES_KEY, ArrayRecord), (META_KEY, ConfigRecord)):
        if key not in content:
            raise PayloadError(tensor=None, field=key, reason="missing record")
        if not isinstance(content[key], kind):
            got = type(content[key]).__name__
            raise PayloadError(
                tensor=None, field=key, reason=f"must be a {kind.__name__}, got {got}"
            )
    return cast(ArrayRecord, content[CODES_KEY]), cast(ConfigRecord, content[META_KEY])


def _split_meta(meta: ConfigRecord, names: set[str]) -> dict[str, dict[str, object]]:
    """Group ``name/field`` keys by tensor; every name needs exactly META_FIELDS."""
    fields: dict[str, dict[str, object]] = {name: {} for name in names}
    for key, value in meta.items():
        name, sep, field = key.rpartition(META_SEP)
        if not sep:
            reason = f"key {key!r} is not 'tensor{META_SEP}field'"
            raise PayloadError(tensor=None, field=META_KEY, reason=reason)
        if name not in fields:
            reason = f"has {META_KEY} but no codes"
            raise PayloadError(tensor=name, field=CODES_KEY, reason=reason)
        if field not in META_FIELDS:
            raise PayloadError(tensor=name, field=field, reason="unexpected metadata field")
        fields[name][field] = value
    for name in sorted(names):
        for field in META_FIELDS:
            if field not in fields[name]:
                raise PayloadError(tensor=name, field=field, reason="missing metadata field")
    return fields


def _check_meta(
    name: str, fields: Mapping[str, object], *, max_clip: float
) -> tuple[int, float, float]:
    """Return ``(bits, clip, mse)`` after checking their types and ranges."""
    bits = fields["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise PayloadError(tensor=name, field="bits", reason=f"must be an int, got {bits!r}")
    try:
        check_bits(bits)
    except ConfigError:
        reason = f"must be in 1..{MAX_CODE_BITS} or {FLOAT_BITS}, got {bits}"
        raise PayloadError(tensor=name, field="bits", reason=reason) from None
    clip = _as_float(name, "clip", fields["clip"])
    if not (math.isfinite(clip) and 0.0 <= clip <= max_clip):
        reason = f"must be finite and in [0, {max_clip:g}], got {clip!r}"
        raise PayloadError(tensor=name, field="clip", reason=reason)
    mse = _as_float(name, "mse", fields["mse"])
    if not (math.isfinite(mse) and 0.0 <= mse <= MAX_MSE):
        reason = f"must be finite and in [0, {MAX_MSE:g}], got {mse!r}"
        raise PayloadError(tensor=name, field="mse", reason=reason)
    if bits == FLOAT_BITS:
        for field, value in (("clip", clip), ("mse", mse)):
            if value != 0.0:
                reason = f"must be 0 with bits {FLOAT_BITS}, got {value!r}"
                raise PayloadError(tensor=name, field=field, reason=reason)
    return bits, clip, mse


def _as_float(name: str, field: str, value: object) -> float:
    """An int (not bool) or float, as float; anything else is the reply's error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(tensor=name, field=field, reason=f"must be a float, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        raise PayloadError(tensor=name, field=field, reason="int out of float range") from None


def _check_shape(
    name: str, shape: object, expected: tuple[int, ...] | None
) -> tuple[tuple[int, ...], int]:
    """Return ``(shape, element count)`` of a declared shape that is sane."""
    if not isinstance(shape, tuple | list):
        reason = f"must be a tuple of ints, got {shape!r}"
        raise PayloadError(tensor=name, field="shape", reason=reason)
    if len(shape) > MAX_NDIM:
        reason = f"more than {MAX_NDIM} dims ({len(shape)})"
        raise PayloadError(tensor=name, field="shape", reason=reason)
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise PayloadError(tensor=name, field="shape", reason=f"dims must be ints, got {dim!r}")
        if not 0 <= dim <= MAX_ELEMENTS:
            reason = f"dims must be in [0, {MAX_ELEMENTS}], got {dim}"
            raise PayloadError(tensor=name, field="shape", reason=reason)
    dims = tuple(shape)
    # Python ints cannot overflow. Zero dims are skipped so that (0, 2**30, 2**30),
    # which numpy could not even describe, is rejected too.
    if math.prod(d for d in dims if d) > MAX_ELEMENTS:
        reason = f"{dims} describes more than {MAX_ELEMENTS} elements"
        raise PayloadError(tensor=name, field="shape", reason=reason)
    if expected is not None and dims != expected:
        raise PayloadError(tensor=name, field="shape", reason=f"expected {expected}, got {dims}")
    return dims, math.prod(dims)


def _decode_array(
    name: str, array: object, *, bits: int, clip: float, expected: tuple[int, ...] | None
) -> np.ndarray:
    if not isinstance(array, Array):
        reason = f"must be an Array, got {type(array).__name__}"
        raise PayloadError(tensor=name, field=CODES_KEY, reason=reason)
    stype, dtype, data = array.stype, array.dtype, array.data
    if bits == FLOAT_BITS:
        want_stype, want_dtype = FLOAT_STYPE, "float32"
    else:
        want_stype, want_dtype = PACKED_STYPE, PACKED_DTYPE
    if stype != want_stype:
        reason = f"must be {want_stype!r} with bits {bits}, got {stype!r}"
        raise PayloadError(tensor=name, field="stype", reason=reason)
    if dtype != want_dtype:
        reason = f"must be {want_dtype!r} with bits {bits}, got {dtype!r}"
        raise PayloadError(tensor=name, field="dtype", reason=reason)
    shape, count = _check_shape(name, array.shape, expected)
    if not isinstance(data, bytes):
        reason = f"must be bytes, got {type(data).__name__}"
        raise PayloadError(tensor=name, field="data", reason=reason)
    if bits == FLOAT_BITS:
        return _load_float32(name, data, shape=shape, count=count)

    size = packed_size(count, bits=bits)
    if len(data) != size:
        reason = f"{len(data)} bytes, but shape {shape} at {bits} bits packs to {size}"
        raise PayloadError(tensor=name, field="data", reason=reason)
    try:
        codes = unpack_codes(data, bits=bits, count=count)  # (count,) uint8
    except ValueError as err:  # the length was checked above; keep the boundary typed
        raise PayloadError(tensor=name, field="data", reason=str(err)) from err
    codes_t = torch.from_numpy(np.asarray(codes, dtype=np.uint8))
    values = dequantize(codes_t, bits=bits, clip=clip)
    return values.numpy().astype(np.float32, copy=False).reshape(shape)  # (*shape)


def _load_float32(name: str, data: bytes, *, shape: tuple[int, ...], count: int) -> np.ndarray:
    """Parse an ``np.save`` buffer without trusting its header.

    ``np.load`` allocates the header's element count before reading the data, so
    the header is parsed here and checked against the declared shape and the byte
    count first; the values are then read with ``np.frombuffer`` (never a pickle).
    """

    def fail(reason: str) -> PayloadError:
        return PayloadError(tensor=name, field="data", reason=reason)

    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as err:  # any parse failure is the reply's fault
        raise fail(f"bad .npy header: {err}") from None
    header_shape, fortran_order, header_dtype = header
    if header_dtype != _FLOAT32:
        raise fail(f".npy dtype must be float32, got {header_dtype}")
    if tuple(header_shape) != shape:
        raise fail(f".npy shape {header_shape} differs from the Array's shape {shape}")
    offset = stream.tell()
    nbytes = count * _FLOAT32.itemsize
    if len(data) - offset != nbytes:
        raise fail(f"{len(data) - offset} value bytes, shape {shape} needs {nbytes}")
    try:
        flat = np.frombuffer(data, dtype=_FLOAT32, count=count, offset=offset)
        values = flat.reshape(shape, order="F" if fortran_order else "C")  # (*shape)
        values = np.array(values, dtype=np.float32, order="C")  # a copy; keeps 0-d
    except Exception as err:
        raise fail(f"unreadable values: {err}") from None
    if not np.isfinite(values).all():
        raise fail("float32 values must be finite")
    return values
