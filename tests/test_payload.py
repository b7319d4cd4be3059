"""Tests for fedquant.payload: round trips, strict validation, size on the wire."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedquant.codec import ClipRule, Rounding, dequantize, quantize
from fedquant.packing import packed_size
from fedquant.payload import (
    CODES_KEY,
    META_KEY,
    PACKED_STYPE,
    DecodedTensor,
    PayloadError,
    decode_update,
    encode_update,
    serialized_size,
)

SEED = 1234
SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (4, 1, 3, 3),
    "conv1.bias": (4,),
    "fc.0.weight": (3, 7),
    "scale": (),
    "empty": (0, 5),
}


def _update(shapes: dict[str, tuple[int, ...]] = SHAPES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def _wire(content: RecordDict) -> RecordDict:
    """What the server receives: the reply after Flower's protobuf round trip."""
    return recorddict_from_proto(recorddict_to_proto(content))


# ----------------------------------------------------------------------- round trip


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rounding", [Rounding.STOCHASTIC, Rounding.NEAREST])
def test_round_trip_matches_dequantize_of_quantize(bits: int, rounding: Rounding) -> None:
    update = _update()
    content = encode_update(
        update, bits=bits, rounding=rounding, generator=torch.Generator().manual_seed(SEED)
    )
    decoded = decode_update(_wire(content), expected=SHAPES)

    # The oracle: quantize the same tensors with the same generator stream, in order.
    g = torch.Generator().manual_seed(SEED)
    assert list(decoded) == list(update)
    for name, tensor in update.items():
        q = quantize(tensor, bits=bits, clip=ClipRule.OCTAV, rounding=rounding, generator=g)
        want = dequantize(q.codes, bits=bits, clip=q.clip).numpy()
        got = decoded[name]
        assert isinstance(got, DecodedTensor)
        assert got.values.dtype == np.float32
        assert got.values.shape == SHAPES[name]
        np.testing.assert_array_equal(got.values, want)
        assert got.bits == bits
        assert got.clip == q.clip
        assert got.mse == q.mse
        if tensor.numel():
            assert np.all(np.abs(got.values) <= q.clip * (1 + 1e-6))


def test_round_trip_float32_mode() -> None:
    update = _update()
    decoded = decode_update(_wire(encode_update(update, bits=32)), expected=SHAPES)
    for name, tensor in update.items():
        got = decoded[name]
        assert (got.bits, got.clip, got.mse) == (32, 0.0, 0.0)
        assert got.values.dtype == np.float32
        np.testing.assert_array_equal(got.values, tensor.numpy())


def test_float32_mode_accepts_fortran_order_and_rejects_nonfinite() -> None:
    x = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    content = encode_update({"w": torch.zeros(2, 3)}, bits=32)
    content[CODES_KEY]["w"] = Array(x)
    np.testing.assert_array_equal(decode_update(content)["w"].values, x)
    content[CODES_KEY]["w"] = Array(np.array([[1.0, np.nan, 0.0]] * 2, dtype=np.float32))
    with pytest.raises(
        PayloadError, match="tensor 'w', field 'data': float32 values must be finite"
    ) as err:
        decode_update(content)
    assert (err.value.tensor, err.value.field) == ("w", "data")


def test_codes_are_raw_packed_bytes() -> None:
    content = encode_update({"w": torch.randn(10, 10)}, bits=3, rounding=Rounding.NEAREST)
    array = content[CODES_KEY]["w"]
    assert (array.dtype, array.shape, array.stype) == ("bitpacked", (10, 10), PACKED_STYPE)
    assert len(array.data) == packed_size(100, bits=3) == 38
    meta = content[META_KEY]
    assert set(meta) == {"w/bits", "w/clip", "w/mse"}
    assert type(meta["w/bits"]) is int and type(meta["w/clip"]) is float


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bits"):
        encode_update({"w": torch.zeros(2)}, bits=16, rounding=Rounding.NEAREST)
    with pytest.raises(TypeError, match="bits"):
        encode_update({"w": torch.zeros(2)}, bits=True, rounding=Rounding.NEAREST)
    with pytest.raises(ValueError, match="floating"):
        encode_update({"w": torch.zeros(2, dtype=torch.int64)}, bits=4, rounding=Rounding.NEAREST)


def test_decode_accepts_int_clip_and_mse() -> None:
    content = encode_update({"w": torch.zeros(3)}, bits=2, rounding=Rounding.NEAREST)
    content[META_KEY]["w/clip"] = 0
    content[META_KEY]["w/mse"] = 0
    got = decode_update(content)["w"]
    assert type(got.clip) is float and type(got.mse) is float


def test_payload_error_message_attributes_and_pickle() -> None:
    err = PayloadError(tensor="fc.weight", field="clip", reason="must be finite and >= 0, got nan")
    assert str(err) == "tensor 'fc.weight', field 'clip': must be finite and >= 0, got nan"
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.tensor, back.field, back.reason, str(back)) == (
        err.tensor,
        err.field,
        err.reason,
        str(err),
    )
    assert str(PayloadError(tensor=None, field="codes", reason="missing record")) == (
        "field 'codes': missing record"
    )


def test_decode_rejects_bad_max_clip() -> None:
    content = encode_update({"w": torch.zeros(3)}, bits=2, rounding=Rounding.NEAREST)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_clip"):
            decode_update(content, max_clip=bad)


# ------------------------------------------------------------------ malformed replies

NAME = "fc.weight"
SHAPE = (6, 5)
EXPECTED = {NAME: SHAPE, "fc.bias": (6,)}
Mutation = Callable[[RecordDict], None]


def _good() -> RecordDict:
    g = torch.Generator().manual_seed(0)
    update = {name: torch.randn(shape, generator=g) for name, shape in EXPECTED.items()}
    return encode_update(update, bits=4, generator=g)


def _set_meta(field: str, value: object) -> Mutation:
    def mutate(content: RecordDict) -> None:
        content[META_KEY][f"{NAME}/{field}"] = value

    return mutate


def _set_array(**changes: object) -> Mutation:
    def mutate(content: RecordDict) -> None:
        old = content[CODES_KEY][NAME]
        fields = {"dtype": old.dtype, "shape": old.shape, "stype": old.stype, "data": old.data}
        fields.update(changes)
        content[CODES_KEY][NAME] = Array(**fields)

    return mutate


def _set_data(fn: Callable[[bytes], bytes]) -> Mutation:
    def mutate(content: RecordDict) -> None:
        old = content[CODES_KEY][NAME]
        content[CODES_KEY][NAME] = Array(
            dtype=old.dtype, shape=old.shape, stype=old.stype, data=fn(old.data)
        )

    return mutate


def _drop_tensor(content: RecordDict) -> None:
    del content[CODES_KEY][NAME]
    for field in ("bits", "clip", "mse"):
        del content[META_KEY][f"{NAME}/{field}"]


def _drop_codes_only(content: RecordDict) -> None:
    del content[CODES_KEY][NAME]


def _extra_tensor(content: RecordDict) -> None:
    extra = encode_update({"extra": torch.zeros(2)}, bits=4, rounding=Rounding.NEAREST)
    content[CODES_KEY]["extra"] = extra[CODES_KEY]["extra"]
    for key, value in extra[META_KEY].items():
        content[META_KEY][key] = value


def _drop_meta(field: str) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del content[META_KEY][f"{NAME}/{field}"]

    return mutate


def _wrong_record(key: str, record: object) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del content[key]  # replacing a record of another type in place logs a warning
        content[key] = record

    return mutate


def _drop_record(key: str) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del content[key]

    return mutate


def _to_float_mode(content: RecordDict) -> None:
    content[META_KEY][f"{NAME}/bits"] = 32
    content[META_KEY][f"{NAME}/clip"] = 0.0
    content[META_KEY][f"{NAME}/mse"] = 0.0


def _float_mode_wrong_shape(content: RecordDict) -> None:
    _to_float_mode(content)
    content[CODES_KEY][NAME] = Array(np.zeros((5, 6), dtype=np.float32))


def _float_mode_wrong_dtype(content: RecordDict) -> None:
    _to_float_mode(content)
    content[CODES_KEY][NAME] = Array(np.zeros(SHAPE, dtype=np.float64))


def _float_mode_header_lies(content: RecordDict) -> None:
    # Array says (6, 5) float32, the .npy header inside says (1000000,).
    _to_float_mode(content)
    good = Array(np.zeros(SHAPE, dtype=np.float32))
    bad = Array(np.zeros(1, dtype=np.float32)).data.replace(b"(1,)", b"(1000000,)")
    content[CODES_KEY][NAME] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=bad)


MALFORMED: dict[str, tuple[Mutation, str | None, str]] = {
    "missing tensor": (_drop_tensor, NAME, "codes"),
    "codes missing, meta present": (_drop_codes_only, NAME, "codes"),
    "extra tensor": (_extra_tensor, "extra", "codes"),
    "missing meta bits": (_drop_meta("bits"), NAME, "bits"),
    "missing meta clip": (_drop_meta("clip"), NAME, "clip"),
    "missing meta mse": (_drop_meta("mse"), NAME, "mse"),
    "extra meta field": (_set_meta("scale", 1.0), NAME, "scale"),
    "meta key without separator": (
        _wrong_record(META_KEY, ConfigRecord({"bits": 4})),
        None,
        "quant",
    ),
    "bits 0": (_set_meta("bits", 0), NAME, "bits"),
    "bits 9": (_set_meta("bits", 9), NAME, "bits"),
    "bits 16": (_set_meta("bits", 16), NAME, "bits"),
    "bits True": (_set_meta("bits", True), NAME, "bits"),
    "bits '4'": (_set_meta("bits", "4"), NAME, "bits"),
    "bits 4.0": (_set_meta("bits", 4.0), NAME, "bits"),
    "clip nan": (_set_meta("clip", math.nan), NAME, "clip"),
    "clip inf": (_set_meta("clip", math.inf), NAME, "clip"),
    "clip -1": (_set_meta("clip", -1.0), NAME, "clip"),
    "clip 1e30": (_set_meta("clip", 1e30), NAME, "clip"),
    "clip huge int": (_set_meta("clip", 10**400), NAME, "clip"),
    "clip True": (_set_meta("clip", True), NAME, "clip"),
    "clip bytes": (_set_meta("clip", b"\x00"), NAME, "clip"),
    "mse nan": (_set_meta("mse", math.nan), NAME, "mse"),
    "mse -1": (_set_meta("mse", -1.0), NAME, "mse"),
    "mse str": (_set_meta("mse", "0.1"), NAME, "mse"),
    "truncated data": (_set_data(lambda d: d[:-1]), NAME, "data"),
    "oversized data": (_set_data(lambda d: d + b"\x00"), NAME, "data"),
    "empty data": (_set_data(lambda d: b""), NAME, "data"),
    "wrong stype": (_set_array(stype="numpy.ndarray"), NAME, "stype"),
    "wrong dtype": (_set_array(dtype="uint8"), NAME, "dtype"),
    "shape mismatch vs expected": (_set_array(shape=(5, 6)), NAME, "shape"),
    "negative dim": (_set_array(shape=(-6, -5)), NAME, "shape"),
    "absurd element count": (_set_array(shape=(2**20, 2**20, 2**20)), NAME, "shape"),
    "zero-size with absurd dims": (_set_array(shape=(0, 2**30, 2**30)), NAME, "shape"),
    "too many dims": (_set_array(shape=(1,) * 40), NAME, "shape"),
    "codes record is a ConfigRecord": (_wrong_record(CODES_KEY, ConfigRecord()), None, "codes"),
    "meta record is a MetricRecord": (_wrong_record(META_KEY, MetricRecord()), None, "quant"),
    "meta record is an ArrayRecord": (_wrong_record(META_KEY, ArrayRecord()), None, "quant"),
    "codes record missing": (_drop_record(CODES_KEY), None, "codes"),
    "meta record missing": (_drop_record(META_KEY), None, "quant"),
    "bits 32 with packed codes": (_to_float_mode, NAME, "stype"),
    "bits 32 with nonzero clip": (_set_meta("bits", 32), NAME, "clip"),
    "bits 32 with wrong shape": (_float_mode_wrong_shape, NAME, "shape"),
    "bits 32 with float64": (_float_mode_wrong_dtype, NAME, "dtype"),
    "bits 32 with lying npy header": (_float_mode_header_lies, NAME, "data"),
}


NOT_ON_THE_WIRE = {"clip huge int"}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_reply_raises_payload_error(case: str) -> None:
    mutate, tensor, field = MALFORMED[case]
    content = _good()
    decode_update(content, expected=EXPECTED)  # the unmutated reply is valid
    mutate(content)
    # Decoded as built in memory and as received after Flower's protobuf round trip
    # (which cannot carry an int beyond 64 bits).
    received = [content] if case in NOT_ON_THE_WIRE else [content, _wire(content)]
    for reply in received:
        with pytest.raises(PayloadError, match=f"field {field!r}") as err:
            decode_update(reply, expected=EXPECTED)
        assert (err.value.tensor, err.value.field) == (tensor, field), str(err.value)


def test_shape_is_checked_against_bytes_without_expected() -> None:
    content = _good()
    _set_array(shape=(5, 5))(content)  # 25 codes at 4 bits = 13 bytes, 15 were sent
    with pytest.raises(
        PayloadError, match=r"15 bytes, but shape \(5, 5\) at 4 bits packs to 13"
    ) as err:
        decode_update(content)
    assert (err.value.tensor, err.value.field) == (NAME, "data")


def test_decode_rejects_non_recorddict() -> None:
    with pytest.raises(PayloadError, match="must be a RecordDict, got dict") as err:
        decode_update({CODES_KEY: ArrayRecord()})  # type: ignore[arg-type]
    assert err.value.field == "content"


# --------------------------------------------------------------------- property test

_META_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 4, 8, 9, 32, True, False]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.binary(max_size=4),
)
_SHAPES = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=12), max_size=4).map(tuple),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=3).map(tuple),
)
_STYPES = st.sampled_from([PACKED_STYPE, "numpy.ndarray", "", "fedquant.bitpacked.v2"])
_DTYPES = st.sampled_from(["bitpacked", "float32", "float64", "uint8", ""])


def _npy_like(draw: st.DrawFn) -> bytes:
    """Sometimes a real .npy buffer (maybe cut or corrupted), else raw bytes."""
    kind = draw(st.sampled_from(["raw", "npy", "npy-cut", "npy-flip"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    shape = draw(st.lists(st.integers(0, 4), max_size=3).map(tuple))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.uint8, ">f4"]))
    data = Array(np.zeros(shape, dtype=dtype)).data
    if kind == "npy-cut":
        return data[: draw(st.integers(0, len(data)))]
    if kind == "npy-flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


@st.composite
def _replies(draw: st.DrawFn) -> RecordDict:
    codes = ArrayRecord()
    meta = ConfigRecord()
    for i in range(draw(st.integers(0, 3))):
        name = f"t{i}"
        shape = draw(_SHAPES)
        data = _npy_like(draw)
        codes[name] = Array(dtype=draw(_DTYPES), shape=shape, stype=draw(_STYPES), data=data)
        for field in ("bits", "clip", "mse"):
            if draw(st.integers(0, 9)) > 0:  # occasionally leave a field out
                meta[f"{name}/{field}"] = draw(_META_VALUES)
    if draw(st.booleans()):
        meta[draw(st.text(max_size=8))] = draw(_META_VALUES)
    return RecordDict({CODES_KEY: codes, META_KEY: meta})


@st.composite
def _plausible_replies(draw: st.DrawFn) -> RecordDict:
    """Well-formed metadata with arbitrary packed bytes: often a valid decode."""
    bits = draw(st.integers(1, 8))
    shape = draw(st.lists(st.integers(0, 5), max_size=3).map(tuple))
    size = packed_size(math.prod(shape), bits=bits)
    data = draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=size + 2)))
    codes = ArrayRecord({"w": Array(dtype="bitpacked", shape=shape, stype=PACKED_STYPE, data=data)})
    meta = ConfigRecord(
        {"w/bits": bits, "w/clip": draw(st.floats(0, 1e6)), "w/mse": draw(st.floats(0, 1e3))}
    )
    return RecordDict({CODES_KEY: codes, META_KEY: meta})


@st.composite
def _plausible_float_replies(draw: st.DrawFn) -> RecordDict:
    """Unquantized mode with .npy-like bytes that may disagree with the Array."""
    shape = draw(st.lists(st.integers(0, 4), max_size=3).map(tuple))
    array = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=_npy_like(draw))
    meta = ConfigRecord({"w/bits": 32, "w/clip": 0.0, "w/mse": 0.0})
    return RecordDict({CODES_KEY: ArrayRecord({"w": array}), META_KEY: meta})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(_replies(), _plausible_replies(), _plausible_float_replies()))
def test_arbitrary_reply_decodes_or_raises_payload_error(content: RecordDict) -> None:
    try:
        decoded = decode_update(content)
    except PayloadError as err:
        assert err.field
        return
    for name, tensor in decoded.items():
        array = content[CODES_KEY][name]
        assert tensor.values.shape == tuple(array.shape)
        assert tensor.values.dtype == np.float32
        assert np.isfinite(tensor.values).all()
        if tensor.bits <= 8:
            assert np.all(np.abs(tensor.values) <= tensor.clip * (1 + 1e-6))


# ------------------------------------------------------------------------ wire size


def test_four_bit_payload_is_an_eighth_of_float32_on_the_wire() -> None:
    # The project's MNIST CNN (fedquant.models.MnistCnn): 114,314 parameters.
    shapes = {
        "conv1.weight": (16, 1, 5, 5),
        "conv1.bias": (16,),
        "conv2.weight": (32, 16, 5, 5),
        "conv2.bias": (32,),
        "fc1.weight": (64, 1568),
        "fc1.bias": (64,),
        "fc2.weight": (10, 64),
        "fc2.bias": (10,),
    }
    update = _update(shapes)
    count = sum(t.numel() for t in update.values())
    assert count >= 100_000

    float_size = serialized_size(
        RecordDict({"arrays": ArrayRecord({n: Array(t.numpy()) for n, t in update.items()})})
    )
    quant = encode_update(update, bits=4, generator=torch.Generator().manual_seed(0))
    quant_size = serialized_size(quant)
    ratio = quant_size / float_size
    bound = 1.03 * 4 / 32
    print(f"4-bit {quant_size} B / float32 {float_size} B = {ratio:.5f} (bound {bound:.5f})")
    assert ratio <= bound
    assert serialized_size(encode_update(update, bits=32)) >= float_size
