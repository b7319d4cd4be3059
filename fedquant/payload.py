"""The payload codec: a model update <-> Flower records.

This module, :mod:`fedquant.reply` (the whole reply around the update: record keys,
metrics, status replies) and :mod:`fedquant.downlink` (the quantized broadcast) are the
only ones in ``fedquant`` that import Flower. A client
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
- ``content[CODEC_KEY]`` (only with a rotation or subtractive dither): a ConfigRecord
  with ``seed``, a public int from which each tensor's rotation signs and dither are
  derived (:func:`tensor_seed`); the server regenerates both from it. The rotation and
  the rounding are the run's settings, known to both ends, never read from the reply.

Around the quantizer (issue 13; options of :func:`encode_update` and
:func:`decode_update`):

- **rotation** (``Rotation.HADAMARD``): the flattened tensor x of N elements is rotated,
  ``y = rotate(x)`` of ``rotated_length(N)`` elements (:mod:`fedquant.rotation`), y is
  quantized, and the server returns ``unrotate(y_hat)[:N]``. The codes then number
  ``rotated_length(N)``, the reported ``mse`` is ``|y - y_hat|**2 / N`` (orthogonality:
  an upper bound on ``|x - x_hat|**2 / N``).
- **unbiased scaling** (DRIVE/EDEN, Vargaftik et al. 2021/2022): the reconstruction is
  multiplied by ``|y|**2 / <y, y_hat>``; the factor is folded into ``clip``, since every
  level (and the dither) is linear in s.
- **entropy coding**: ``bits`` B is then the budget in bits per coordinate. Two grids are
  tried: B-bit codes with OCTAV's clip, and codes of ``min(8, B + 2)`` bits whose clip is
  the smallest for which the ANS-coded size (:mod:`fedquant.entropy`) fits B bits per
  coordinate; the one with the smaller error is sent. Codes are ANS-coded when that is
  smaller than packing them (``Array(dtype="ans", stype=ENTROPY_STYPE)``), raw packed
  otherwise, and the tensor's ``bits`` is its code width.

Decoding is strict: every problem raises :class:`PayloadError`, naming the tensor
and the field, and no other exception type escapes :func:`decode_update`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedquant import entropy, rotation
from fedquant.codec import ClipRule, Rounding, dequantize, quantize
from fedquant.config import MAX_CODE_BITS, UNQUANTIZED_BITS, ConfigError, Rotation, check_bits
from fedquant.packing import pack_codes, packed_size, unpack_codes

__all__ = [
    "CODEC_KEY",
    "CODES_KEY",
    "ENTROPY_DTYPE",
    "ENTROPY_STYPE",
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
    "needs_seed",
    "serialized_size",
    "tensor_seed",
]

CODES_KEY = "codes"
"""RecordDict key of the ArrayRecord holding one Array per tensor."""
META_KEY = "quant"
"""RecordDict key of the ConfigRecord holding the per-tensor bits, clip and mse."""
PACKED_STYPE = "fedquant.bitpacked.v1"
"""``Array.stype`` of bit-packed codes (raw bytes, ``fedquant.packing`` layout)."""
PACKED_DTYPE = "bitpacked"
"""``Array.dtype`` of bit-packed codes."""
ENTROPY_STYPE = "fedquant.ans.v1"
"""``Array.stype`` of ANS-coded codes (``fedquant.entropy`` layout)."""
ENTROPY_DTYPE = "ans"
"""``Array.dtype`` of ANS-coded codes."""
CODEC_KEY = "codec"
"""RecordDict key of the ConfigRecord with the reply's public ``seed`` (rotation, dither)."""
SEED_FIELD = "seed"
MAX_SEED = 2**63 - 1
"""Largest reply seed (a ConfigRecord int is a signed 64-bit integer)."""
_ENTROPY_EXTRA_BITS = 2
"""Extra code bits of the finer grid tried under entropy coding (B + 2, at most 8)."""
_RATE_SEARCH_STEPS = 14
"""Bisection steps on log(clip) of the rate control (2**-14 relative precision in s)."""
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


def needs_seed(*, rotation: Rotation, rounding: Rounding) -> bool:
    """Whether a reply carries ``CODEC_KEY``: a rotation or subtractive dither is on."""
    return rotation is not Rotation.NONE or rounding is Rounding.DITHERED


def tensor_seed(seed: int, name: str, stream: str) -> int:
    """A tensor's 64-bit seed for ``stream`` ("rotation" or "dither"), from the reply's.

    BLAKE2b of the three, so tensors and streams get unrelated signs and dithers, and a
    tensor's seed does not depend on the order of the others.
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class _Seeds:
    """A tensor's rotation and dither seeds (None: that transform is off)."""

    rotation: int | None = None
    dither: int | None = None


def _tensor_seeds(seed: int | None, name: str, *, rotation: Rotation, rounding: Rounding) -> _Seeds:
    """The seeds of tensor ``name`` for the transforms the run uses (both ends alike)."""
    if seed is None:
        return _Seeds()
    return _Seeds(
        rotation=tensor_seed(seed, name, "rotation") if rotation is Rotation.HADAMARD else None,
        dither=tensor_seed(seed, name, "dither") if rounding is Rounding.DITHERED else None,
    )


@dataclass(frozen=True)
class _Encoded:
    """One quantized tensor as it will be sent."""

    array: Array
    bits: int
    clip: float
    mse: float


def encode_update(
    update: Mapping[str, torch.Tensor],
    *,
    bits: int,
    clip: ClipRule = ClipRule.OCTAV,
    rounding: Rounding = Rounding.STOCHASTIC,
    generator: torch.Generator | None = None,
    rotation: Rotation = Rotation.NONE,
    unbiased_scale: bool = False,
    entropy_coding: bool = False,
    seed: int | None = None,
) -> RecordDict:
    """Quantize each tensor of ``update`` and pack it into a reply ``RecordDict``.

    With ``bits`` in 1..8 every tensor goes through
    ``fedquant.codec.quantize(t, bits=bits, clip=clip, rounding=rounding,
    generator=generator)`` (paper B: clip to ``[-s, s]``, ``c = floor(n*y + u)``
    or ``round(n*y)``) and its codes are bit-packed; ``rotation``, ``unbiased_scale``
    and ``entropy_coding`` wrap it as the module docstring says. With ``bits == 32``
    each tensor is sent as float32 (clip 0, mse 0). Stochastic rounding needs
    ``generator`` (``quantize`` enforces it); a rotation or ``Rounding.DITHERED`` needs
    ``seed`` (public: the server reads it from the reply). Tensors are encoded in
    ``update``'s order.

    Raises:
        ValueError: ``bits`` not in 1..8 or 32 (``fedquant.config.check_bits``), a
            tensor that is not floating point, a missing or out-of-range ``seed``.
        TypeError: a value that is not a ``torch.Tensor`` or a key that is not a str.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"`bits` must be an int, got {bits!r}")
    check_bits(bits)  # ConfigError (a ValueError) naming `bits`
    if not isinstance(clip, ClipRule):
        raise TypeError(f"`clip` must be a ClipRule, got {clip!r}")
    if not isinstance(rounding, Rounding):
        raise TypeError(f"`rounding` must be a Rounding, got {rounding!r}")
    if not isinstance(rotation, Rotation):
        raise TypeError(f"`rotation` must be a Rotation, got {rotation!r}")
    with_seed = bits != FLOAT_BITS and needs_seed(rotation=rotation, rounding=rounding)
    if with_seed and not (
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED
    ):
        raise ValueError(f"`seed` must be an int in [0, {MAX_SEED}] here. Found `{seed!r}`.")

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
            bits_sent, clip_value, mse = bits, 0.0, 0.0
        else:
            encoded = _encode_tensor(
                tensor.detach(),
                shape,
                bits=bits,
                clip=clip,
                rounding=rounding,
                generator=generator,
                seeds=_tensor_seeds(seed, name, rotation=rotation, rounding=rounding),
                unbiased_scale=unbiased_scale,
                entropy_coding=entropy_coding,
            )
            codes[name] = encoded.array
            bits_sent, clip_value, mse = encoded.bits, encoded.clip, encoded.mse
        meta[_meta_key(name, "bits")] = bits_sent
        meta[_meta_key(name, "clip")] = clip_value
        meta[_meta_key(name, "mse")] = mse
    content = RecordDict({CODES_KEY: codes, META_KEY: meta})
    if with_seed:
        assert seed is not None  # checked above
        content[CODEC_KEY] = ConfigRecord({SEED_FIELD: seed})
    return content


def _encode_tensor(
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    *,
    bits: int,
    clip: ClipRule,
    rounding: Rounding,
    generator: torch.Generator | None,
    seeds: _Seeds,
    unbiased_scale: bool,
    entropy_coding: bool,
) -> _Encoded:
    """Rotate, quantize (under a rate budget with entropy coding), rescale and code."""
    flat = tensor.to(device="cpu", dtype=torch.float32).reshape(-1).contiguous().numpy()
    count = flat.size
    y = flat if seeds.rotation is None else rotation.rotate(flat, seeds.rotation)
    y_t = torch.from_numpy(y)
    dither_seed = seeds.dither

    def trial(
        width: int, s: ClipRule | float, gen: torch.Generator | None
    ) -> tuple[np.ndarray, float, float]:
        q = quantize(
            y_t, bits=width, clip=s, rounding=rounding, generator=gen, dither_seed=dither_seed
        )
        mse = float(q.mse) if y.size == count else float(q.mse) * y.size / count
        return q.codes.numpy(), float(q.clip), mse

    codes, s, mse = trial(bits, clip, generator)
    width = bits
    if entropy_coding and bits < MAX_CODE_BITS and y.size:
        # Stochastic rounding: one more draw of the caller's generator, replayed for every
        # trial of the rate control, so the codes sent are those the search measured.
        draw = None
        if rounding is Rounding.STOCHASTIC and isinstance(generator, torch.Generator):
            draw = int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64))

        def replayed(w: int, s: ClipRule | float) -> tuple[np.ndarray, float, float]:
            return trial(w, s, None if draw is None else torch.Generator().manual_seed(draw))

        fine_bits = min(MAX_CODE_BITS, bits + _ENTROPY_EXTRA_BITS)
        fine = _rate_controlled(replayed, fine_bits, bits, count)
        if fine is not None and fine[2] < mse:
            codes, s, mse = fine
            width = fine_bits
    if unbiased_scale and y.size:
        y_hat = _reconstruct(codes, width, s, dither_seed)
        inner = float(np.dot(y.astype(np.float64), y_hat.astype(np.float64)))
        if inner > 0.0:
            scale = float(np.dot(y.astype(np.float64), y.astype(np.float64))) / inner
            s *= scale
            err = y.astype(np.float64) - scale * y_hat.astype(np.float64)
            mse = float(np.dot(err, err)) / max(count, 1)
    data = entropy.encode_codes(codes, bits=width) if entropy_coding else None
    if data is None:
        array = Array(
            dtype=PACKED_DTYPE, shape=shape, stype=PACKED_STYPE, data=pack_codes(codes, bits=width)
        )
    else:
        array = Array(dtype=ENTROPY_DTYPE, shape=shape, stype=ENTROPY_STYPE, data=data)
    return _Encoded(array=array, bits=width, clip=s, mse=mse)


_Trial = Callable[[int, ClipRule | float], tuple[np.ndarray, float, float]]


def _rate_controlled(
    trial: _Trial, width: int, budget_bits: int, count: int
) -> tuple[np.ndarray, float, float] | None:
    """The ``width``-bit codes with the smallest clip whose coded size fits the budget.

    The coded size falls as the clip s grows (coarser steps); starting from OCTAV's s,
    s is doubled until the estimate (:func:`fedquant.entropy.coded_size_estimate`) fits
    ``budget_bits * count`` bits, then bisected on log s. None when no s fits.
    """
    limit = budget_bits * count

    def fits(result: tuple[np.ndarray, float, float]) -> bool:
        histogram = np.bincount(result[0], minlength=1 << width)
        return bool(entropy.coded_size_estimate(histogram) <= limit)

    low = trial(width, ClipRule.OCTAV)
    if fits(low):
        return low
    s_low = low[1]
    if s_low <= 0.0:
        return None
    s_high, high = s_low, low
    for _ in range(24):  # up to 2**24 x OCTAV's clip
        s_high *= 2.0
        high = trial(width, s_high)
        if fits(high):
            break
    else:
        return None
    for _ in range(_RATE_SEARCH_STEPS):
        middle = math.sqrt(s_low * s_high)
        result = trial(width, middle)
        if fits(result):
            s_high, high = middle, result
        else:
            s_low = middle
    return high


def _reconstruct(codes: np.ndarray, bits: int, clip: float, dither_seed: int | None) -> np.ndarray:
    """``dequantize`` of flat codes, as a flat float32 array."""
    values = dequantize(torch.from_numpy(codes), bits=bits, clip=clip, dither_seed=dither_seed)
    return values.numpy().reshape(-1)


def serialized_size(content: RecordDict) -> int:
    """Bytes of ``content`` as Flower serializes it (``RecordDict`` protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())


# ----------------------------------------------------------------------------- decode


def decode_update(
    content: RecordDict,
    *,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    max_clip: float = 1e6,
    rotation: Rotation = Rotation.NONE,
    rounding: Rounding = Rounding.STOCHASTIC,
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
    right number of bytes) and must hold finite values. ``rotation`` and ``rounding``
    are the run's (``Rounding.DITHERED`` subtracts the dither): with either on, the
    ``CODEC_KEY`` record must hold exactly an int ``seed`` in ``0..MAX_SEED``, and with
    neither it must be absent; codes number ``rotated_length(N)`` under a rotation; an
    ANS-coded Array must be shorter than the packed codes would be and decode to
    exactly that many codes (:func:`fedquant.entropy.decode_codes`).

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
    seed = _reply_seed(content, needs_seed(rotation=rotation, rounding=rounding))
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
        seeds = _tensor_seeds(seed, name, rotation=rotation, rounding=rounding)
        values = _decode_array(name, codes[name], bits=bits, clip=clip, expected=want, seeds=seeds)
        decoded[name] = DecodedTensor(values=values, bits=bits, clip=clip, mse=mse)
    return decoded


def _reply_seed(content: RecordDict, required: bool) -> int | None:
    """The reply's public seed (``CODEC_KEY``), present exactly when ``required``."""
    if CODEC_KEY not in content:
        if required:
            raise PayloadError(tensor=None, field=CODEC_KEY, reason="missing record")
        return None
    if not required:
        reason = "unexpected: this run uses neither a rotation nor dither"
        raise PayloadError(tensor=None, field=CODEC_KEY, reason=reason)
    record = content[CODEC_KEY]
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {SEED_FIELD}:
        reason = f"must be a ConfigRecord holding exactly {SEED_FIELD!r}"
        raise PayloadError(tensor=None, field=CODEC_KEY, reason=reason)
    seed = record[SEED_FIELD]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        reason = f"must be an int in [0, {MAX_SEED}], got {seed!r}"
        raise PayloadError(tensor=None, field=SEED_FIELD, reason=reason)
    return seed


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
    name: str,
    array: object,
    *,
    bits: int,
    clip: float,
    expected: tuple[int, ...] | None,
    seeds: _Seeds = _Seeds(),
) -> np.ndarray:
    if not isinstance(array, Array):
        reason = f"must be an Array, got {type(array).__name__}"
        raise PayloadError(tensor=name, field=CODES_KEY, reason=reason)
    stype, dtype, data = array.stype, array.dtype, array.data
    if bits == FLOAT_BITS:
        allowed = {FLOAT_STYPE: "float32"}
    else:
        allowed = {PACKED_STYPE: PACKED_DTYPE, ENTROPY_STYPE: ENTROPY_DTYPE}
    if stype not in allowed:
        reason = f"must be one of {sorted(allowed)} with bits {bits}, got {stype!r}"
        raise PayloadError(tensor=name, field="stype", reason=reason)
    if dtype != allowed[stype]:
        reason = f"must be {allowed[stype]!r} with stype {stype!r}, got {dtype!r}"
        raise PayloadError(tensor=name, field="dtype", reason=reason)
    shape, count = _check_shape(name, array.shape, expected)
    if not isinstance(data, bytes):
        reason = f"must be bytes, got {type(data).__name__}"
        raise PayloadError(tensor=name, field="data", reason=reason)
    if bits == FLOAT_BITS:
        return _load_float32(name, data, shape=shape, count=count)

    # Codes of the rotated vector: rotated_length(count) <= 2 count of them.
    coded = count if seeds.rotation is None else rotation.rotated_length(count)
    size = packed_size(coded, bits=bits)
    if stype == ENTROPY_STYPE:
        if len(data) >= size:
            reason = f"{len(data)} ANS bytes, not fewer than the {size} of packed codes"
            raise PayloadError(tensor=name, field="data", reason=reason)
        try:
            codes = entropy.decode_codes(data, bits=bits, count=coded)  # (coded,) uint8
        except ValueError as err:
            raise PayloadError(tensor=name, field="data", reason=str(err)) from err
    else:
        if len(data) != size:
            described = f"shape {shape}" if coded == count else f"{coded} rotated codes"
            reason = f"{len(data)} bytes, but {described} at {bits} bits packs to {size}"
            raise PayloadError(tensor=name, field="data", reason=reason)
        try:
            codes = unpack_codes(data, bits=bits, count=coded)  # (coded,) uint8
        except ValueError as err:  # the length was checked above; keep the boundary typed
            raise PayloadError(tensor=name, field="data", reason=str(err)) from err
    values = _reconstruct(np.asarray(codes, dtype=np.uint8), bits, clip, seeds.dither)
    if seeds.rotation is not None:
        values = rotation.unrotate(values, count, seeds.rotation)
    return values.astype(np.float32, copy=False).reshape(shape)  # (*shape)


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
