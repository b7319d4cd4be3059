"""The codec's modes through the reply format: rotation, dither, entropy coding, scaling.

Each mode is checked where the server meets it, ``encode_update`` on the client and the
strict ``decode_update`` on the server: what the server rebuilds, how unbiased it is,
what it costs in bits, and what a hostile payload gets.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, RecordDict

from fedquant import entropy, rotation
from fedquant.codec import ClipRule, Rounding
from fedquant.config import Rotation
from fedquant.packing import packed_size
from fedquant.payload import (
    CODEC_KEY,
    CODES_KEY,
    ENTROPY_DTYPE,
    ENTROPY_STYPE,
    PACKED_STYPE,
    PayloadError,
    decode_update,
    encode_update,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    """A model-update-like vector: Student-t (3 dof) with a few large spikes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=n).astype(np.float32) * 1e-3
    x[rng.choice(n, size=n // 500, replace=False)] *= 30.0
    return torch.from_numpy(x)


def _round_trip(x: torch.Tensor, **options: object) -> tuple[np.ndarray, RecordDict]:
    kwargs: dict[str, object] = {"bits": 4, "seed": 11, **options}
    kwargs.setdefault("generator", torch.Generator().manual_seed(5))
    content = encode_update({"w": x}, **kwargs)  # type: ignore[arg-type]
    decoded = decode_update(
        content,
        expected={"w": tuple(x.shape)},
        rotation=kwargs.get("rotation", Rotation.NONE),  # type: ignore[arg-type]
        rounding=kwargs.get("rounding", Rounding.STOCHASTIC),  # type: ignore[arg-type]
    )
    return decoded["w"].values, content


def _vnmse(x: torch.Tensor, x_hat: np.ndarray) -> float:
    ref = x.numpy().astype(np.float64)
    return float(np.sum((ref - x_hat) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize("count", [1, 7, 4096, 5000])
@pytest.mark.parametrize("rounding", [Rounding.NEAREST, Rounding.DITHERED])
def test_the_server_inverts_the_rotation_and_reports_the_error_it_will_see(
    count: int, rounding: Rounding
) -> None:
    x = _heavy_tailed(count, seed=count)
    x_hat, content = _round_trip(x, bits=8, rotation=Rotation.HADAMARD, rounding=rounding)
    assert x_hat.shape == (count,)
    assert content[CODES_KEY]["w"].stype == PACKED_STYPE
    assert len(content[CODES_KEY]["w"].data) == packed_size(rotation.rotated_length(count), bits=8)
    # The reported MSE is |y - y_hat|^2 / N over the padded rotated vector: the server's
    # error in x plus what landed on the padding, so never below it (float32 slack).
    reported = content["quant"]["w/mse"]
    actual = float(np.mean((x.numpy().astype(np.float64) - x_hat) ** 2))
    assert actual <= reported * (1 + 1e-4) + 1e-30
    if count == 4096:  # a power of two: no padding, the two are the same number
        assert actual == pytest.approx(reported, rel=1e-3)
    # 8 bits of a rotated vector: far below the signal.
    assert _vnmse(x, x_hat) < 1e-3


def test_rotation_cuts_the_error_of_heavy_tailed_updates_at_fixed_rate() -> None:
    """Rotation turns the spikes into near-Gaussian coordinates the uniform grid fits."""
    x = _heavy_tailed(1 << 16)
    plain = _vnmse(x, _round_trip(x, rounding=Rounding.NEAREST)[0])
    rotated = _vnmse(x, _round_trip(x, rounding=Rounding.NEAREST, rotation=Rotation.HADAMARD)[0])
    assert rotated < plain / 2


@pytest.mark.parametrize("bits", [2, 4])
def test_entropy_coding_reaches_twice_the_rate_distortion_limit(bits: int) -> None:
    """At B bits per coordinate sent, vNMSE <= 2 x 2^-2B (the Gaussian limit D(R)).

    Entropy-coded uniform scalar quantization sits ~1.53 dB (x1.42) above D(R) at high
    rate, so the bound holds with margin for a Gaussian vector; the bits counted are the
    whole Array payload (header, histogram and ANS stream).
    """
    x = torch.from_numpy(np.random.default_rng(3).normal(size=1 << 16).astype(np.float32))
    x_hat, content = _round_trip(
        x, bits=bits, entropy_coding=True, rotation=Rotation.HADAMARD, rounding=Rounding.DITHERED
    )
    array = content[CODES_KEY]["w"]
    assert array.stype == ENTROPY_STYPE and array.dtype == ENTROPY_DTYPE
    sent_bits = 8 * len(array.data) / x.numel()
    assert sent_bits <= bits * 1.01
    assert _vnmse(x, x_hat) <= 2 * 2.0 ** (-2 * bits)


def test_entropy_coding_falls_back_to_packed_codes_when_it_does_not_pay() -> None:
    # Uniform values at 8 bits: every code equally likely, nothing to gain.
    x = torch.from_numpy(np.random.default_rng(4).uniform(-1, 1, 1 << 14).astype(np.float32))
    x_hat, content = _round_trip(x, bits=8, entropy_coding=True, clip=ClipRule.MAX)
    assert content[CODES_KEY]["w"].stype == PACKED_STYPE
    assert _vnmse(x, x_hat) < 1e-4


def _unbiased_stats(options: dict[str, object], trials: int = 300) -> tuple[float, float]:
    """(chi-square of the per-coordinate mean errors, its degrees of freedom).

    Each coordinate's mean error over ``trials`` independent encodings (fresh seeds) is
    divided by its standard error; under unbiasedness the sum of squares is ~chi^2_N.
    """
    x = _heavy_tailed(256, seed=9)
    samples = []
    for t in range(trials):
        gen = torch.Generator().manual_seed(1000 + t)
        samples.append(_round_trip(x, bits=2, seed=t, generator=gen, **options)[0])
    err = np.stack(samples).astype(np.float64) - x.numpy()
    mean, sd = err.mean(axis=0), err.std(axis=0, ddof=1)
    varying = sd > 0
    z = mean[varying] / (sd[varying] / math.sqrt(trials))
    return float(np.sum(z**2)), float(varying.sum())


@pytest.mark.parametrize(
    "options",
    [
        {"rounding": Rounding.STOCHASTIC},
        {"rounding": Rounding.DITHERED},
        {"rounding": Rounding.STOCHASTIC, "rotation": Rotation.HADAMARD},
        {"rounding": Rounding.DITHERED, "rotation": Rotation.HADAMARD},
        {"rounding": Rounding.DITHERED, "rotation": Rotation.HADAMARD, "entropy_coding": True},
    ],
    ids=["stochastic", "dithered", "stochastic-rotated", "dithered-rotated", "dithered-ans"],
)
def test_unbiased_modes_are_unbiased_within_four_standard_errors(
    options: dict[str, object],
) -> None:
    """chi^2_N within N + 4 sqrt(2N); clip = max so no clipping bias (OCTAV clips)."""
    chi2, dof = _unbiased_stats({**options, "clip": ClipRule.MAX})
    assert chi2 <= dof + 4 * math.sqrt(2 * dof)


def test_the_unbiasedness_check_detects_a_biased_mode() -> None:
    """Negative control: nearest rounding after a random rotation is not unbiased.

    (Coordinates whose error never varies, such as values always clipped, carry no
    standard error and are left out of the statistic, so clipping is not a control.)
    """
    options = {"rounding": Rounding.NEAREST, "rotation": Rotation.HADAMARD, "clip": ClipRule.MAX}
    chi2, dof = _unbiased_stats(options)
    assert chi2 > dof + 4 * math.sqrt(2 * dof)


def test_unbiased_scaling_removes_the_shrinkage_of_nearest_rounding() -> None:
    """DRIVE/EDEN: with the scale |y|^2/<y, y_hat>, <x, x_hat> = |x|^2 exactly."""
    x = _heavy_tailed(4096, seed=2)
    for scaled in (False, True):
        x_hat, _ = _round_trip(
            x, bits=1, rounding=Rounding.NEAREST, rotation=Rotation.HADAMARD, unbiased_scale=scaled
        )
        ratio = float(np.dot(x.numpy().astype(np.float64), x_hat) / np.sum(x.numpy() ** 2.0))
        if scaled:
            assert ratio == pytest.approx(1.0, rel=1e-4)
        else:
            assert ratio < 0.9  # 1-bit signs shrink: E<x, sign-level> < |x|^2


# ----------------------------------------------------------------------------- hostile


def _entropy_content() -> RecordDict:
    x = torch.from_numpy(np.random.default_rng(6).normal(size=1 << 14).astype(np.float32))
    content = encode_update(
        {"w": x},
        bits=4,
        rounding=Rounding.NEAREST,
        entropy_coding=True,
        generator=None,
    )
    assert content[CODES_KEY]["w"].stype == ENTROPY_STYPE
    return content


def _with_data(
    content: RecordDict, data: bytes, shape: tuple[int, ...] | None = None
) -> RecordDict:
    array = content[CODES_KEY]["w"]
    forged = RecordDict(dict(content.items()))
    codes = type(content[CODES_KEY])()
    codes["w"] = Array(
        dtype=array.dtype, shape=shape or tuple(array.shape), stype=array.stype, data=data
    )
    forged[CODES_KEY] = codes
    return forged


@pytest.mark.parametrize("cut", [0, 1, 5, 40, -40, -4, -1])
def test_a_truncated_entropy_payload_is_rejected(cut: int) -> None:
    content = _entropy_content()
    data = content[CODES_KEY]["w"].data
    with pytest.raises(PayloadError, match="'data'"):
        decode_update(_with_data(content, data[:cut]), expected={"w": (1 << 14,)})


def test_an_inflated_entropy_payload_is_rejected() -> None:
    content = _entropy_content()
    data = content[CODES_KEY]["w"].data
    with pytest.raises(PayloadError, match="'data'"):
        decode_update(_with_data(content, data + b"\0" * 8), expected={"w": (1 << 14,)})
    # Longer than the packed codes: never what the encoder sends.
    too_long = data + bytes(packed_size(1 << 14, bits=4))
    with pytest.raises(PayloadError, match="not fewer than"):
        decode_update(_with_data(content, too_long), expected={"w": (1 << 14,)})


def test_a_huge_declared_length_fails_without_allocating_it() -> None:
    """A payload declaring 2^31 - 1 elements, and bytes that claim a huge stream.

    Decoding must fail on the byte count or the stream's own checks before allocating
    anything near the declared tensor.
    """
    content = _entropy_content()
    data = bytearray(content[CODES_KEY]["w"].data)
    data[1:9] = b"\xff" * 8  # header bytes after the version: counts, lengths
    forged = _with_data(content, bytes(data), shape=(2**31 - 1,))
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError):
            decode_update(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data) + (1 << 20)


def test_the_codec_record_is_required_exactly_when_the_run_uses_a_seed() -> None:
    x = _heavy_tailed(64)
    rotated = encode_update(
        {"w": x}, bits=4, rounding=Rounding.NEAREST, rotation=Rotation.HADAMARD, seed=3
    )
    plain = encode_update({"w": x}, bits=4, rounding=Rounding.NEAREST)
    # The run rotates, the reply has no seed.
    with pytest.raises(PayloadError, match="'codec'"):
        decode_update(plain, rotation=Rotation.HADAMARD, rounding=Rounding.NEAREST)
    # The run does not rotate, the reply carries a seed.
    with pytest.raises(PayloadError, match="'codec'"):
        decode_update(rotated, rounding=Rounding.NEAREST)
    for bad in (-1, 2**63, "3", True):
        forged = RecordDict(dict(rotated.items()))
        forged[CODEC_KEY] = ConfigRecord({"seed": bad})  # type: ignore[dict-item]
        with pytest.raises(PayloadError, match="seed|codec"):
            decode_update(forged, rotation=Rotation.HADAMARD, rounding=Rounding.NEAREST)
    with pytest.raises(ValueError, match="seed"):
        encode_update({"w": x}, bits=4, rounding=Rounding.DITHERED)


def test_entropy_payload_bits_are_what_the_module_estimates() -> None:
    """The rate control's estimate and the coded size agree (the budget is real)."""
    x = torch.from_numpy(np.random.default_rng(8).normal(size=1 << 15).astype(np.float32))
    _, content = _round_trip(x, bits=3, entropy_coding=True, rounding=Rounding.NEAREST)
    codes = entropy.decode_codes(
        content[CODES_KEY]["w"].data, bits=content["quant"]["w/bits"], count=x.numel()
    )
    histogram = np.bincount(codes, minlength=1 << content["quant"]["w/bits"])
    estimate = entropy.coded_size_estimate(histogram)
    assert estimate == pytest.approx(8 * len(content[CODES_KEY]["w"].data), rel=0.03)
