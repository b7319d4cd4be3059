"""Tests for ``Rounding.DITHERED`` (subtractive dither): properties against oracles.

Subtractive dither (Roberts 1962; Schuchman 1964; for federated learning Shlezinger et
al., "UVeQFed", 2020): with t = n y and U ~ U[0, 1) regenerated from the public seed,
c = floor(t + U) and x_hat = s (2c/n - 1) - (U - 1/2) Delta, Delta = 2 s / n. Inside the
clip range the error in steps, e = (x - x_hat) / Delta, is uniform on [-1/2, 1/2) and
independent of x. The tolerances below follow from its moments: E e = 0, E e**2 = 1/12,
E e**4 = 1/80, so Var e = 1/12 and Var e**2 = 1/80 - 1/144 = 1/180; the standard error
of a mean of N errors is sqrt(1 / (12 N)), that of their sample variance
sqrt(1 / (180 N)) (Var of a sample variance = (mu4 - sigma**4) / N to first order).
Every check is at a fixed seed, within 4 standard errors.
"""

from __future__ import annotations

import math

import codec_oracle as oracle
import numpy as np
import pytest
import torch

from fedquant.codec import (
    ClipRule,
    Rounding,
    dequantize,
    dither_offsets,
    octav_clip,
    quantize,
)

MEAN_VAR = 1.0 / 12.0  # Var e for e ~ U[-1/2, 1/2)
SQUARE_VAR = 1.0 / 180.0  # Var e**2 = E e**4 - (E e**2)**2 = 1/80 - 1/144
SAMPLES = 1 << 18


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stochastic_key(seed: int) -> int:
    """The key of STOCHASTIC rounding with ``_gen(seed)``: the generator's first draw.

    ``quantize`` draws ``torch.randint(0, 2**62, (1,))`` once per call; DITHERED takes the
    key directly as ``dither_seed``.
    """
    return int(torch.randint(0, 2**62, (1,), generator=_gen(seed), dtype=torch.int64))


def _uniform(size: int, s: float, seed: int) -> torch.Tensor:
    """Values uniform on [-s, s]: the fractional parts of t = n y are uniform too."""
    return ((torch.rand(size, generator=_gen(seed), dtype=torch.float64) * 2 - 1) * s).float()


def _step(bits: int, s: float) -> float:
    return 2.0 * s / (2**bits - 1)


def _dithered_steps(x: torch.Tensor, *, bits: int, s: float, seed: int) -> np.ndarray:
    """(x - x_hat) / Delta in float64, x_hat as the server decodes it (float32)."""
    q = quantize(x, bits=bits, clip=s, rounding=Rounding.DITHERED, dither_seed=seed)
    x_hat = dequantize(q.codes, bits=bits, clip=s, dither_seed=seed)
    return (x.double() - x_hat.double()).numpy().reshape(-1) / _step(bits, s)


def _fraction(x: torch.Tensor, *, bits: int, s: float) -> np.ndarray:
    """frac(t), t = (clip(x) + s) / Delta: where x lies between two levels."""
    t = (np.clip(x.double().numpy(), -s, s) + s) / _step(bits, s)
    return t - np.floor(t)


def _flat_bins(
    err: np.ndarray, labels: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: |mean| / its SE, |sample variance - 1/12| / its SE, and the counts."""
    mean_z, var_z, counts = [], [], []
    for b in range(bins):
        e = err[labels == b]
        counts.append(e.size)
        mean_z.append(abs(e.mean()) / math.sqrt(MEAN_VAR / e.size))
        var_z.append(abs(e.var() - MEAN_VAR) / math.sqrt(SQUARE_VAR / e.size))
    return np.array(mean_z), np.array(var_z), np.array(counts)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.5, "7", np.int64(-3)])
def test_invalid_dither_seed_raises_naming_dither_seed(bad: object) -> None:
    x = torch.randn(10)
    codes = torch.zeros(10, dtype=torch.uint8)
    calls = [
        lambda: quantize(x, bits=4, rounding=Rounding.DITHERED, dither_seed=bad),  # type: ignore[arg-type]
        lambda: dequantize(codes, bits=4, clip=1.0, dither_seed=bad),  # type: ignore[arg-type]
        lambda: dither_offsets(bad, 3),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(ValueError, match="`dither_seed`") as info:
            call()
        assert repr(bad) in str(info.value)


def test_dither_seed_is_required_by_dithered_and_refused_by_the_other_modes() -> None:
    x = torch.randn(10)
    with pytest.raises(ValueError, match="`dither_seed`.*DITHERED"):
        quantize(x, bits=4, rounding=Rounding.DITHERED)
    with pytest.raises(ValueError, match="`dither_seed`"):  # a generator is no substitute
        quantize(x, bits=4, rounding=Rounding.DITHERED, generator=_gen(0))
    with pytest.raises(ValueError, match="`dither_seed`"):
        quantize(torch.zeros(0), bits=4, rounding=Rounding.DITHERED)
    with pytest.raises(ValueError, match="`dither_seed`"):
        quantize(x, bits=4, rounding=Rounding.NEAREST, dither_seed=1)
    with pytest.raises(ValueError, match="`dither_seed`"):
        quantize(x, bits=4, rounding=Rounding.STOCHASTIC, generator=_gen(0), dither_seed=1)
    with pytest.raises(ValueError, match="`count`"):
        dither_offsets(1, -1)
    for seed in (0, 2**64 - 1, np.uint64(2**64 - 1)):  # the whole uint64 range is a key
        q = quantize(x, bits=4, rounding=Rounding.DITHERED, dither_seed=seed)  # type: ignore[arg-type]
        assert dequantize(q.codes, bits=4, clip=q.clip, dither_seed=seed).shape == x.shape  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(0,), (3, 0), ()])
def test_empty_and_zero_dim_tensors(shape: tuple[int, ...]) -> None:
    x = torch.full(shape, -0.7)
    q = quantize(x, bits=3, clip=ClipRule.MAX, rounding=Rounding.DITHERED, dither_seed=5)
    assert q.codes.shape == x.shape
    x_hat = dequantize(q.codes, bits=3, clip=q.clip, dither_seed=5)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert q.mse == pytest.approx(
        float(((x.double() - x_hat.double()) ** 2).mean()) if x.numel() else 0.0
    )


# ----------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("seed", [0, 1, 0x5EED, 2**63, 2**64 - 1])
def test_dither_offsets_match_the_oracle_stream(seed: int) -> None:
    for count in (1, 63, 64, 65, 10_001):
        u = dither_offsets(seed, count)
        assert u.dtype == np.float64 and u.shape == (count,)
        assert np.array_equal(u, oracle.dither_offsets(seed, count))
        assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    # counter-based: element i depends on (seed, i) only
    assert np.array_equal(dither_offsets(seed, 10_001)[:6_000], dither_offsets(seed, 6_000))


def test_consecutive_seeds_give_unrelated_streams() -> None:
    # Independent U: equal 24-bit words are rare (expected count 2**18 / 2**24 = 1/64),
    # and the correlation of the two streams is within 4 / sqrt(N) of 0.
    a = dither_offsets(7, SAMPLES)
    b = dither_offsets(8, SAMPLES)
    assert int(np.sum(a == b)) <= 2
    assert abs(float(np.corrcoef(a, b)[0, 1])) <= 4 / math.sqrt(SAMPLES)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_codes_are_the_stochastic_codes_of_the_same_key(bits: int, dtype: torch.dtype) -> None:
    # Key map: STOCHASTIC keys the stream with its generator's first draw; DITHERED with
    # dither_seed itself. Same key, same codes, and the oracle's c = (rint(t 2**24) + k) >> 24.
    x = torch.randn(70_001, generator=_gen(bits), dtype=dtype) * 2  # some |x| > s
    key = _stochastic_key(bits)
    for clip in (1.5, ClipRule.MAX):
        st = quantize(x, bits=bits, clip=clip, rounding=Rounding.STOCHASTIC, generator=_gen(bits))
        g = _gen(99)
        state = g.get_state()
        dq = quantize(
            x, bits=bits, clip=clip, rounding=Rounding.DITHERED, generator=g, dither_seed=key
        )
        assert torch.equal(g.get_state(), state)  # the generator is neither needed nor advanced
        assert dq.clip == st.clip
        assert torch.equal(dq.codes, st.codes)
        if clip == 1.5:
            want = oracle.stochastic_codes(x.numpy(), bits=bits, s=1.5, key=key)
            assert np.array_equal(dq.codes.numpy(), want)
    other = quantize(x, bits=bits, clip=1.5, rounding=Rounding.DITHERED, dither_seed=key + 1)
    assert not torch.equal(other.codes, dq.codes)


# ----------------------------------------------------------------------------- encoder = decoder


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [1.5, ClipRule.MAX, ClipRule.OCTAV])
def test_decoder_reproduces_the_values_whose_error_the_encoder_reported(
    bits: int, dtype: torch.dtype, clip: ClipRule | float
) -> None:
    """Decoded values = float32(x_hat); reported mse = mean((x - x_hat)**2); x_hat: oracle.

    x_hat = s (2c/n - 1) - (U - 1/2) Delta in float64 with U from the oracle's stream.
    The decoder rounds it once to float32: within half a float32 ulp. The encoder works in
    u = x a (a = n / (2 s)) with unit roundoff eps of x's dtype (float32: 2**-24); u, the
    level difference, the dither sum and a itself each err by at most a few eps relative,
    so each element's error in u-units is off by eta_i <= 8 eps max(|u_i|, n/2 + 1), and
    the mean of squares by at most mean(2 eta |e| + eta**2), plus 24 eps mse for the
    16-term partial sums and a**2.
    """
    n, seed = 2**bits - 1, 1_000 + bits
    x = (torch.randn(1_001, 7, generator=_gen(seed), dtype=dtype) * 0.6).t()  # (7, 1001), strided
    q = quantize(x, bits=bits, clip=clip, rounding=Rounding.DITHERED, dither_seed=seed)
    s = q.clip
    codes = q.codes.numpy().reshape(-1)  # flat C order of the logical (7, 1001) tensor
    x64 = x.double().numpy().reshape(-1)
    x_hat64 = oracle.dithered_values(
        codes, bits=bits, s=s, offsets=oracle.dither_offsets(seed, x64.size)
    )

    out = dequantize(q.codes, bits=bits, clip=s, dither_seed=seed)
    assert out.dtype == torch.float32 and out.shape == x.shape
    got = out.numpy().reshape(-1)
    half_ulp = 0.5 * np.spacing(np.abs(got)).astype(np.float64) + 1e-15 * s
    assert np.all(np.abs(got.astype(np.float64) - x_hat64) <= half_ulp)

    a = n / (2.0 * s)
    eps = 2.0**-24 if dtype == torch.float32 else 2.0**-53
    err_u = (x64 - x_hat64) * a
    eta = 8 * eps * np.maximum(np.abs(x64 * a), n / 2 + 1)
    mse_u = float(np.mean(err_u**2))
    bound_u = float(np.mean(2 * eta * np.abs(err_u) + eta**2)) + 24 * eps * mse_u
    assert abs(q.mse * a * a - mse_u) <= bound_u
    # ... far tighter than the error left by not subtracting the dither (~Delta**2/12)
    undithered = oracle.dithered_values(codes, bits=bits, s=s, offsets=np.full(x64.size, 0.5))
    assert abs(float(np.mean(((x64 - undithered) * a) ** 2)) - mse_u) > 100 * bound_u


# ----------------------------------------------------------------------------- error distribution


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_is_uniform_inside_the_clip_range(bits: int) -> None:
    """The error in steps is U[-1/2, 1/2): range, mean, variance, Kolmogorov-Smirnov.

    KS: D = sup |F_N - F| over N errors; by the Dvoretzky-Kiefer-Wolfowitz inequality
    with Massart's constant, P(D > d) <= 2 exp(-2 N d**2), so d = sqrt(ln(2 / alpha) /
    (2 N)) bounds D with probability 1 - alpha (alpha = 1e-3). The same statistic
    rejects stochastic rounding's error (triangular on (-1, 1)).
    """
    s = 2.0
    x = torch.randn(SAMPLES, generator=_gen(30 + bits))  # about 5% outside [-s, s]
    inside = (x.abs() <= s).numpy()
    err = _dithered_steps(x, bits=bits, s=s, seed=40 + bits)[inside]
    size = err.size
    # float32 output: x_hat is off by up to 2**-24 s, i.e. 2**-25 n steps
    assert float(np.abs(err).max()) <= 0.5 + 2.0**-25 * (2**bits - 1)
    assert abs(float(err.mean())) <= 4 * math.sqrt(MEAN_VAR / size)
    assert abs(float(err.var()) - MEAN_VAR) <= 4 * math.sqrt(SQUARE_VAR / size)

    def ks(e: np.ndarray) -> float:
        cdf = np.clip(np.sort(e) + 0.5, 0.0, 1.0)
        ranks = np.arange(1, e.size + 1) / e.size
        return float(max(np.max(ranks - cdf), np.max(cdf - (ranks - 1.0 / e.size))))

    bound = math.sqrt(math.log(2 / 1e-3) / (2 * size))
    assert ks(err) <= bound
    st = quantize(x, bits=bits, clip=s, rounding=Rounding.STOCHASTIC, generator=_gen(1))
    st_err = (x.double() - dequantize(st.codes, bits=bits, clip=s).double()).numpy()
    assert ks(st_err[inside] / _step(bits, s)) > 10 * bound  # the test has power


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_error_is_independent_of_the_input(bits: int) -> None:
    """No correlation with x, and the same mean 0 and variance 1/12 wherever x lies.

    x uniform on [-s, s]. The sample correlation of independent variables has standard
    error 1 / sqrt(N). In 16 bins of frac(t) (the position between two levels) and in
    16 bins of x, the mean and the sample variance stay within 4 standard errors of 0
    and 1/12 (per bin of N_b errors: sqrt(1 / (12 N_b)), sqrt(1 / (180 N_b))).
    Stochastic rounding, whose error variance is f (1 - f) at fraction f, fails the
    frac(t) check.
    """
    s, bins = 0.8, 16
    x = _uniform(SAMPLES, s, 50 + bits)
    err = _dithered_steps(x, bits=bits, s=s, seed=60 + bits)
    corr = float(np.corrcoef(err, x.double().numpy())[0, 1])
    assert abs(corr) <= 4 / math.sqrt(SAMPLES)

    frac_bins = np.minimum((_fraction(x, bits=bits, s=s) * bins).astype(int), bins - 1)
    x_bins = np.minimum(((x.double().numpy() + s) / (2 * s) * bins).astype(int), bins - 1)
    for labels in (frac_bins, x_bins):
        mean_z, var_z, counts = _flat_bins(err, labels, bins)
        assert counts.min() > SAMPLES // (2 * bins)
        assert float(mean_z.max()) <= 4 and float(var_z.max()) <= 4, (mean_z, var_z)

    st = quantize(x, bits=bits, clip=s, rounding=Rounding.STOCHASTIC, generator=_gen(2))
    st_err = (x.double() - dequantize(st.codes, bits=bits, clip=s).double()).numpy()
    _, st_var_z, _ = _flat_bins(st_err / _step(bits, s), frac_bins, bins)
    assert float(st_var_z.max()) > 40  # the test has power


@pytest.mark.parametrize("value", [0.0, 0.123, -0.8, 3.0])
def test_any_constant_errs_by_delta_squared_over_12(value: float) -> None:
    # Nearest rounding of a constant errs by a fixed amount, stochastic rounding by
    # f (1 - f) Delta**2; dithered rounding by Delta**2 / 12 plus the clipping error
    # (value - s)**2 (3.0 is clipped to s = 0.8; the cross term has mean 0, variance
    # 4 (value - s)**2 Delta**2 / 12 per element).
    bits, s = 3, 0.8
    step = _step(bits, s)
    x = torch.full((SAMPLES,), value)
    q = quantize(x, bits=bits, clip=s, rounding=Rounding.DITHERED, dither_seed=70)
    gap = max(abs(value) - s, 0.0)
    expected = gap**2 + step**2 / 12
    se = math.sqrt((4 * gap**2 * step**2 / 12 + step**4 * SQUARE_VAR) / SAMPLES)
    assert abs(q.mse - expected) <= 4 * se


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_averaging_over_dither_seeds_is_unbiased(bits: int) -> None:
    """For a fixed x, x_hat over 2000 seeds averages to clip(x), with variance Delta**2 / 12.

    Each element, clipped or not, gets an independent error of variance Delta**2 / 12
    per seed: the mean is within 4 Delta / sqrt(12 * 2000) of clip(x), and the sample
    variance within 4 Delta**2 sqrt(1 / (180 * 2000)) of Delta**2 / 12.
    """
    s, draws = 1.0, 2_000
    step = _step(bits, s)
    x = torch.linspace(-1.3, 1.3, 241, dtype=torch.float64).float()  # includes clipped values
    x_hats = np.empty((draws, x.numel()))
    for seed in range(draws):
        q = quantize(x, bits=bits, clip=s, rounding=Rounding.DITHERED, dither_seed=seed)
        x_hats[seed] = dequantize(q.codes, bits=bits, clip=s, dither_seed=seed).numpy()
    target = x.double().clamp(-s, s).numpy()
    bias = np.abs(x_hats.mean(axis=0) - target)
    assert float(bias.max()) <= 4 * step * math.sqrt(MEAN_VAR / draws)
    spread = np.abs(x_hats.var(axis=0) / step**2 - MEAN_VAR)
    assert float(spread.max()) <= 4 * math.sqrt(SQUARE_VAR / draws)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_variance_is_half_that_of_stochastic_rounding(bits: int) -> None:
    """Uniform fractions: E e**2 = Delta**2 / 12 (dithered) vs Delta**2 / 6 (stochastic).

    Same x, same key (so the same codes); the ratio R = mean(D) / mean(S) of the mean
    squared errors has, by the delta method, Var R = R**2 (Var D / mD**2 + Var S / mS**2
    - 2 Cov(D, S) / (mD mS)) / N, estimated from the sample.
    """
    s = 0.6
    x = _uniform(SAMPLES, s, 80 + bits)
    key = _stochastic_key(90 + bits)
    st = quantize(x, bits=bits, clip=s, rounding=Rounding.STOCHASTIC, generator=_gen(90 + bits))
    dq = quantize(x, bits=bits, clip=s, rounding=Rounding.DITHERED, dither_seed=key)
    assert torch.equal(st.codes, dq.codes)
    x64 = x.double()
    sq_s = ((x64 - dequantize(st.codes, bits=bits, clip=s).double()) ** 2).numpy()
    sq_d = ((x64 - dequantize(dq.codes, bits=bits, clip=s, dither_seed=key).double()) ** 2).numpy()
    m_d, m_s = float(sq_d.mean()), float(sq_s.mean())
    ratio = m_d / m_s
    cov = np.cov(sq_d, sq_s)
    rel_var = cov[0, 0] / m_d**2 + cov[1, 1] / m_s**2 - 2 * cov[0, 1] / (m_d * m_s)
    se = ratio * math.sqrt(rel_var / SAMPLES)
    assert abs(ratio - 0.5) <= 4 * se
    assert dq.mse == pytest.approx(m_d, rel=1e-5) and st.mse == pytest.approx(m_s, rel=1e-5)


# ----------------------------------------------------------------------------- OCTAV


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_octav_targets_the_dithered_error_model(bits: int) -> None:
    """OCTAV for DITHERED minimizes Delta**2 / 12 + E (|x| - s)_+**2, as the oracle does.

    Matches the oracle's documented search (fixed point with kappa N, then the polish on
    the expected MSE) on a full and a subsampled tensor; beats a 1000-point grid of s;
    ``quantize`` with ClipRule.OCTAV uses it, and the realized MSE is within 4 standard
    errors of the expected one: per element (g + d)**2 with clipping error g and dither
    error d, Var = 4 g**2 Delta**2 / 12 + Delta**4 / 180.
    """
    n = 2**bits - 1
    for size in (4_097, 200_003):  # the second one is subsampled by OCTAV
        x = torch.randn(size, generator=_gen(size + bits))
        s = octav_clip(x, bits=bits, rounding=Rounding.DITHERED)
        want = oracle.octav_clip(x.numpy(), bits=bits, rounding=Rounding.DITHERED)
        assert s == pytest.approx(want, rel=1e-12)
    xn = x.double().numpy()[:20_000]
    x = x[:20_000]
    s = octav_clip(x, bits=bits, rounding=Rounding.DITHERED)

    def expected_mse(v: float) -> float:
        return oracle.mse_at(xn, n=n, s=v, rounding=Rounding.DITHERED)

    grid = np.linspace(0.3, 1.0, 1000) * float(np.abs(xn).max())
    assert expected_mse(s) <= 1.0001 * min(expected_mse(float(v)) for v in grid)
    assert s != octav_clip(x, bits=bits, rounding=Rounding.NEAREST)
    q = quantize(x, bits=bits, clip=ClipRule.OCTAV, rounding=Rounding.DITHERED, dither_seed=3)
    assert q.clip == s
    gap = np.maximum(np.abs(xn) - s, 0.0)
    step = _step(bits, s)
    se = math.sqrt(float(np.sum(4 * gap**2 * step**2 / 12 + step**4 * SQUARE_VAR))) / xn.size
    assert abs(q.mse - expected_mse(s)) <= 4 * se
