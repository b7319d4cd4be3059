"""Tests for fedquant.aggregate: rules against numpy oracles, resolution, validation."""

from __future__ import annotations

import importlib
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from fedquant.aggregate import (
    DEFAULT_WEIGHT_CAP,
    RULES,
    AggregationRule,
    ErrorWeighted,
    SampleWeighted,
    TrimmedMean,
    aggregate_tensors,
    cap_shares,
    coordinate_median,
    norm_clip_scales,
    plain_mean,
    resolve_rule,
    sample_weighted,
    update_norm,
)

K = 5
SHAPES = {"conv.weight": (3, 2, 2), "conv.bias": (3,), "scale": ()}
RNG_SEED = 7


Replies = tuple[list[dict[str, np.ndarray]], list[dict[str, float]], list[int]]


def _replies(k: int = K, seed: int = RNG_SEED) -> Replies:
    """K clients' tensors, per-tensor MSEs and example counts."""
    rng = np.random.default_rng(seed)
    clients = [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(k)
    ]
    mse = [{name: float(rng.uniform(1e-4, 1e-1)) for name in SHAPES} for _ in range(k)]
    num_examples = [int(n) for n in rng.integers(1, 1000, size=k)]
    return clients, mse, num_examples


def _stack(clients: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([c[name] for c in clients]).astype(np.float64)  # (K, *shape)


# ------------------------------------------------------------------- oracles


def test_error_weighted_matches_np_average() -> None:
    """The paper's rule, uncapped: w_i ∝ 1/mse_i."""
    clients, mse, n = _replies()
    rule = ErrorWeighted(cap=math.inf)
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=rule)
    for name, shape in SHAPES.items():
        weights = np.array([1.0 / m[name] for m in mse])
        want = np.average(_stack(clients, name), axis=0, weights=weights)
        assert out[name].shape == shape and out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-6)


def test_fedavg_matches_np_average() -> None:
    clients, mse, n = _replies()
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=sample_weighted)
    for name in SHAPES:
        want = np.average(_stack(clients, name), axis=0, weights=n)
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-6)


def test_plain_mean_matches_np_mean() -> None:
    clients, mse, n = _replies()
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=RULES["mean"])
    for name in SHAPES:
        want = _stack(clients, name).mean(axis=0)
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-6)


def test_equal_errors_give_plain_mean() -> None:
    clients, _, n = _replies()
    mse = [{name: 0.03 for name in SHAPES} for _ in clients]
    weighted = aggregate_tensors(clients, mse=mse, num_examples=n, rule=ErrorWeighted())
    for name in SHAPES:
        want = _stack(clients, name).mean(axis=0)
        np.testing.assert_allclose(weighted[name], want, rtol=1e-6, atol=1e-6)


def test_weights_are_per_tensor() -> None:
    # Client 0 is exact on "a" and poor on "b"; client 1 the other way round.
    clients = [
        {"a": np.array([1.0]), "b": np.array([1.0])},
        {"a": np.array([3.0]), "b": np.array([3.0])},
    ]
    mse = [{"a": 1e-3, "b": 3e-3}, {"a": 3e-3, "b": 1e-3}]
    out = aggregate_tensors(clients, mse=mse, num_examples=[1, 1], rule=ErrorWeighted())
    np.testing.assert_allclose(out["a"], [1.5], rtol=1e-6)  # weights 3:1
    np.testing.assert_allclose(out["b"], [2.5], rtol=1e-6)  # weights 1:3


def test_zero_mse_client_dominates_as_the_floor_implies() -> None:
    values = np.array([[1.0, -2.0], [5.0, 7.0], [-3.0, 0.5]])  # (K=3, 2)
    mse = np.array([0.0, 1e-2, 2e-2])
    rule = ErrorWeighted(floor=1e-12, cap=math.inf)
    out = rule(values, mse=mse, num_examples=np.ones(3))
    assert np.isfinite(out).all()
    weights = 1.0 / np.maximum(mse, 1e-12)
    np.testing.assert_allclose(out, np.average(values, axis=0, weights=weights), rtol=1e-6)
    np.testing.assert_allclose(out, values[0], rtol=1e-8, atol=1e-8)
    # A coarser floor lets the others back in, exactly as 1/max(mse, floor) says.
    coarse = ErrorWeighted(floor=1e-2, cap=math.inf)(values, mse=mse, num_examples=np.ones(3))
    want = np.average(values, axis=0, weights=[100, 100, 50])
    np.testing.assert_allclose(coarse, want, rtol=1e-6)


def _water_fill_oracle(raw: np.ndarray, cap: float) -> np.ndarray:
    """Water-filling by brute force.

    The largest claims sit at the bound cap / K and the rest share what is left in
    proportion to their claims; the answer is the first count of clients at the bound
    for which no free share exceeds it.
    """
    k = raw.size
    bound = cap / k
    for fixed_count in range(k + 1):
        fixed = np.argsort(-raw, kind="stable")[:fixed_count]
        free = np.setdiff1d(np.arange(k), fixed)
        shares = np.zeros(k)
        shares[fixed] = bound
        if free.size:
            shares[free] = (1 - bound * fixed_count) * raw[free] / raw[free].sum()
        if (shares <= bound * (1 + 1e-9)).all():
            return shares
    raise AssertionError("no feasible assignment")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [1.0, 1.5, 2.0, 4.0])
def test_cap_shares_matches_water_filling_oracle(seed: int, cap: float) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(sigma=2.0, size=8)
    shares = cap_shares(raw, cap=cap)
    assert shares.sum() == pytest.approx(1.0, rel=1e-12)
    assert shares.max() <= cap / raw.size * (1 + 1e-9)
    np.testing.assert_allclose(shares, _water_fill_oracle(raw, cap), rtol=1e-9)
    # Below the bound the ratios of the claims are kept; the order is never inverted.
    below = shares < cap / raw.size * (1 - 1e-9)
    if below.sum() > 1:
        np.testing.assert_allclose(shares[below] / raw[below], (shares[below] / raw[below])[0])
    assert (np.diff(shares[np.argsort(raw)]) >= -1e-15).all()


def test_a_zero_mse_reply_gets_at_most_cap_over_k() -> None:
    """Claiming no error at all buys exactly cap / K of the weight, not all of it."""
    values = np.array([[10.0]] + [[0.0]] * 9)
    mse = np.array([0.0] + [1e-3] * 9)
    out = ErrorWeighted()(values, mse=mse, num_examples=np.ones(10))
    np.testing.assert_allclose(out, [10.0 * DEFAULT_WEIGHT_CAP / 10], rtol=1e-9)
    fedavg = RULES["fedavg"](values, mse=mse, num_examples=np.array([10**6] + [5000] * 9))
    np.testing.assert_allclose(fedavg, [10.0 * DEFAULT_WEIGHT_CAP / 10], rtol=1e-9)


def test_cap_is_validated() -> None:
    for bad in (0.5, 0.0, -1.0, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="cap"):
            ErrorWeighted(cap=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="cap"):
            SampleWeighted(cap=bad)  # type: ignore[arg-type]


def test_all_zero_mse_gives_plain_mean() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = ErrorWeighted()(values, mse=np.zeros(3), num_examples=np.ones(3))
    np.testing.assert_allclose(out, values.mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize(
    "mse",
    [
        [1e300, 1e-300, 1.0],
        [1e308, 1e308, 1e308],
        [1e-320, 5e-324, 0.0],  # subnormals, all below the floor
        [1e-300, 2e-300, 4e-300],  # all below the floor: plain mean
    ],
)
def test_extreme_mse_does_not_overflow(mse: list[float]) -> None:
    values = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow is harmless
        out = ErrorWeighted(cap=math.inf)(values, mse=np.array(mse), num_examples=np.ones(3))
    assert np.isfinite(out).all()
    # Oracle: w_i = 1/max(mse_i, floor), rescaled in log space so it cannot overflow.
    log_e = np.log(np.maximum(np.array(mse), 1e-12))
    weights = np.exp(log_e.min() - log_e)
    np.testing.assert_allclose(out, np.average(values, axis=0, weights=weights), rtol=1e-6)


def test_permuting_replies_does_not_change_the_result() -> None:
    clients, mse, n = _replies(k=7)
    perm = np.random.default_rng(0).permutation(7)
    for rule in RULES.values():
        out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=rule)
        shuffled = aggregate_tensors(
            [clients[i] for i in perm],
            mse=[mse[i] for i in perm],
            num_examples=[n[i] for i in perm],
            rule=rule,
        )
        for name in SHAPES:
            np.testing.assert_allclose(shuffled[name], out[name], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ robust rules


def _trimmed_mean_oracle(values: np.ndarray, cut: int) -> np.ndarray:
    """Per coordinate, in plain Python: drop `cut` values from each end of the sort."""
    k = values.shape[0]
    columns = values.reshape(k, -1).T  # (coordinates, K)
    out = [statistics.fmean(sorted(column.tolist())[cut : k - cut]) for column in columns]
    return np.array(out).reshape(values.shape[1:])


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_median_matches_np_median(k: int) -> None:
    clients, mse, n = _replies(k=k)
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=RULES["median"])
    for name, shape in SHAPES.items():
        assert out[name].shape == shape and out[name].dtype == np.float32
        want = np.median(_stack(clients, name), axis=0)
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7)


def test_median_of_even_k_is_the_mean_of_the_middle_two() -> None:
    values = np.array([[4.0], [1.0], [3.0], [100.0]])  # sorted: 1, 3, 4, 100
    out = coordinate_median(values, mse=np.zeros(4), num_examples=np.ones(4))
    np.testing.assert_array_equal(out, [3.5])


@pytest.mark.parametrize(
    ("k", "byzantine"), [(5, 1), (6, 1), (4, 1), (10, 1), (7, 2), (9, 4), (3, 0), (10, 3)]
)
def test_trimmed_mean_matches_sort_oracle(k: int, byzantine: int) -> None:
    clients, mse, n = _replies(k=k)
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=TrimmedMean(byzantine))
    for name in SHAPES:
        want = _trimmed_mean_oracle(_stack(clients, name), byzantine)
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("k", "ratio"), [(5, 0.2), (6, 0.2), (10, 0.1), (8, 0.3)])
def test_trimmed_mean_matches_scipy(k: int, ratio: float) -> None:
    """SciPy cuts int(ratio * K) from each end: the same as byzantine = that count."""
    stats = pytest.importorskip("scipy.stats")
    clients, mse, n = _replies(k=k)
    rule = TrimmedMean(int(ratio * k))
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=rule)
    for name in SHAPES:
        want = stats.trim_mean(_stack(clients, name), ratio, axis=0)
        np.testing.assert_allclose(out[name], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_trimmed_mean_with_too_few_replies_cuts_all_but_the_middle(k: int) -> None:
    """With K < 2b + 1 it cuts floor((K - 1) / 2) from each end: the median for odd K."""
    clients, mse, n = _replies(k=k)
    trimmed = aggregate_tensors(clients, mse=mse, num_examples=n, rule=TrimmedMean(3))
    for name in SHAPES:
        want = _trimmed_mean_oracle(_stack(clients, name), (k - 1) // 2)
        np.testing.assert_allclose(trimmed[name], want, rtol=1e-6, atol=1e-7)
    if k % 2:
        median = aggregate_tensors(clients, mse=mse, num_examples=n, rule=coordinate_median)
        for name in SHAPES:
            np.testing.assert_allclose(trimmed[name], median[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("k", "rule"),
    [(5, coordinate_median), (6, coordinate_median), (5, TrimmedMean(1)), (6, TrimmedMean(1))],
    ids=["median-odd", "median-even", "trimmed-odd", "trimmed-even"],
)
def test_one_outlier_does_not_move_robust_rules(k: int, rule: AggregationRule) -> None:
    clients, mse, n = _replies(k=k)
    results = []
    for magnitude in (1e3, -1e3, 1e30):
        hostile = [dict(c) for c in clients]
        hostile[0] = {name: np.full(shape, magnitude, np.float32) for name, shape in SHAPES.items()}
        results.append(aggregate_tensors(hostile, mse=mse, num_examples=n, rule=rule))
        honest = clients[1:]
        for name in SHAPES:
            low = _stack(honest, name).min(axis=0)
            high = _stack(honest, name).max(axis=0)
            assert (low <= results[-1][name]).all() and (results[-1][name] <= high).all()
    for name in SHAPES:
        # The outlier's size does not matter, only which side it is on; a mean moves.
        np.testing.assert_array_equal(results[0][name], results[2][name])
    mean = aggregate_tensors(hostile, mse=mse, num_examples=n, rule=plain_mean)
    assert np.abs(mean["conv.bias"]).min() > 1e20


def test_trimmed_mean_count_is_validated() -> None:
    for bad in (-1, 0.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="byzantine"):
            TrimmedMean(bad)  # type: ignore[arg-type]


def test_robust_rules_are_registered() -> None:
    assert resolve_rule("median") is coordinate_median
    trimmed = resolve_rule("trimmed-mean")
    assert isinstance(trimmed, TrimmedMean) and trimmed.byzantine == 1


# ---------------------------------------------------------------- norm bound


def test_update_norm_is_the_l2_norm_over_all_tensors() -> None:
    clients, _, _ = _replies(k=1)
    flat = np.concatenate([np.ravel(v).astype(np.float64) for v in clients[0].values()])
    assert update_norm(clients[0]) == pytest.approx(np.linalg.norm(flat), rel=1e-12)


def test_norm_clip_scales_bring_outliers_exactly_to_the_bound() -> None:
    norms = np.array([1.0, 2.0, 3.0, 300.0, 25.0])  # median 3
    scales, bound = norm_clip_scales(norms, factor=5.0)
    assert bound == 15.0
    np.testing.assert_allclose(scales * norms, np.minimum(norms, bound), rtol=1e-15)
    np.testing.assert_array_equal(scales[:3], 1.0)
    assert math.isclose(scales[3] * 300.0, 15.0, rel_tol=1e-15)


def test_norm_clip_scales_with_a_zero_median_zero_outliers() -> None:
    scales, bound = norm_clip_scales([0.0, 0.0, 4.0], factor=10.0)
    assert bound == 0.0
    np.testing.assert_array_equal(scales, [1.0, 1.0, 0.0])


def test_norm_clip_scales_validates_inputs() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="factor"):
            norm_clip_scales([1.0], factor=bad)
    for norms in ([], [1.0, -1.0], [1.0, float("nan")], [[1.0]]):
        with pytest.raises(ValueError, match="norms"):
            norm_clip_scales(norms, factor=2.0)


# ------------------------------------------------------------ rule validation


def test_error_weighted_floor_is_validated() -> None:
    for bad in (0.0, -1e-9, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="floor"):
            ErrorWeighted(floor=bad)


def test_sample_weighted_rejects_empty_or_negative_counts() -> None:
    values = np.ones((2, 3))
    with pytest.raises(ValueError, match="sum"):
        sample_weighted(values, mse=np.zeros(2), num_examples=np.array([0, 0]))
    with pytest.raises(ValueError, match=">= 0"):
        sample_weighted(values, mse=np.zeros(2), num_examples=np.array([-1, 5]))


def test_rules_reject_mismatched_shapes() -> None:
    values = np.ones((3, 2))
    with pytest.raises(ValueError, match="mse"):
        ErrorWeighted()(values, mse=np.ones(2), num_examples=np.ones(3))
    with pytest.raises(ValueError, match="mse"):
        ErrorWeighted()(values, mse=np.array([1.0, np.nan, 1.0]), num_examples=np.ones(3))
    with pytest.raises(ValueError, match="num_examples"):
        sample_weighted(values, mse=np.ones(3), num_examples=np.ones(4))
    with pytest.raises(ValueError, match="K >= 1"):
        plain_mean(np.ones((0, 2)), mse=np.ones(0), num_examples=np.ones(0))


@pytest.mark.parametrize("name", sorted(RULES))
def test_builtin_rules_keep_the_rule_contract(name: str) -> None:
    """Each registered rule is called as AggregationRule says and keeps unanimity.

    ``rule(values (K, *shape), *, mse (K,), num_examples (K,))`` returns the tensor's
    shape; when all K clients send the same tensor, every rule (weighted or not, robust or
    not) must return that tensor, whatever the errors and counts claim.
    """
    rule = RULES[name]
    rng = np.random.default_rng(0)
    tensor = rng.standard_normal((3, 2))
    values = np.stack([tensor] * 5)  # (K=5, 3, 2)
    mse, counts = rng.uniform(1e-4, 1e-1, size=5), rng.integers(1, 1000, size=5)
    out = rule(values, mse=mse, num_examples=counts)
    assert np.asarray(out).shape == tensor.shape
    np.testing.assert_allclose(out, tensor, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="positional argument"):
        rule(values, mse, counts)  # type: ignore[misc]  # mse and num_examples are keyword-only


# ------------------------------------------------------------ custom rules

CALLS: list[tuple[int, ...]] = []


def counting_rule(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
    """A custom rule: the median; records each call's values shape."""
    CALLS.append(values.shape)
    return np.median(values, axis=0)


class CountingMedian:
    """A custom rule given as a class (instantiated with no arguments)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        self.calls += 1
        return np.median(values, axis=0)


COUNTING_MEDIAN = CountingMedian()
NOT_CALLABLE = 42


class NeedsArgs:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(
        self, values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray
    ) -> np.ndarray:
        return values.mean(axis=0)


@pytest.fixture
def this_module(monkeypatch: pytest.MonkeyPatch) -> object:
    """This file as ``tests.test_aggregate``, the module a ``"module:attr"`` spec names.

    Pytest may have imported it under another name (``test_aggregate``) when
    ``tests`` has no ``__init__.py``; the spec then loads it afresh, so counters are
    read from the module resolve_rule actually used.
    """
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    return importlib.import_module("tests.test_aggregate")


def test_custom_function_by_module_path_is_called(this_module: object) -> None:
    rule = resolve_rule("tests.test_aggregate:counting_rule")
    calls = this_module.CALLS  # type: ignore[attr-defined]
    calls.clear()
    clients, mse, n = _replies()
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=rule)
    assert calls == [(K, *shape) for shape in SHAPES.values()]
    for name in SHAPES:
        np.testing.assert_allclose(out[name], np.median(_stack(clients, name), axis=0), rtol=1e-6)


def test_custom_class_by_module_path_is_instantiated_and_called(this_module: object) -> None:
    rule = resolve_rule("tests.test_aggregate:CountingMedian")
    assert isinstance(rule, this_module.CountingMedian)  # type: ignore[attr-defined]
    clients, mse, n = _replies()
    aggregate_tensors(clients, mse=mse, num_examples=n, rule=rule)
    assert rule.calls == len(SHAPES)  # type: ignore[attr-defined]


def test_custom_instance_by_module_path(this_module: object) -> None:
    rule = resolve_rule("tests.test_aggregate:COUNTING_MEDIAN")
    assert rule is this_module.COUNTING_MEDIAN  # type: ignore[attr-defined]


def test_custom_callable_passes_through_and_is_called() -> None:
    calls = []

    def rule(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
        calls.append((values.shape, mse.shape, num_examples.shape))
        return values[0]

    assert resolve_rule(rule) is rule
    clients, mse, n = _replies()
    out = aggregate_tensors(clients, mse=mse, num_examples=n, rule=resolve_rule(rule))
    assert calls == [((K, *shape), (K,), (K,)) for shape in SHAPES.values()]
    for name in SHAPES:
        np.testing.assert_array_equal(out[name], clients[0][name])


def test_registry_names_resolve() -> None:
    for name, rule in RULES.items():
        assert resolve_rule(name) is rule


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("krum", "unknown aggregation rule 'krum'"),
        ("no_such_pkg_fq.rules:mean", "cannot import module 'no_such_pkg_fq.rules'"),
        ("fedquant.aggregate:no_such_rule", "has no attribute 'no_such_rule'"),
        ("tests.test_aggregate:NOT_CALLABLE", "not callable"),
        ("tests.test_aggregate:NeedsArgs", "instantiated without arguments"),
        ("fedquant.aggregate:", "expected 'package.module:attr'"),
        (":plain_mean", "expected 'package.module:attr'"),
    ],
)
def test_resolve_rule_errors_name_the_spec(this_module: object, spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        resolve_rule(spec)
    assert repr(spec) in str(err.value)


def test_resolve_rule_rejects_non_callable_objects() -> None:
    with pytest.raises(TypeError, match="must be a str or callable, got 3.0"):
        resolve_rule(3.0)  # type: ignore[arg-type]


def test_resolve_by_module_path_finds_builtin_rules() -> None:
    assert resolve_rule("fedquant.aggregate:plain_mean") is plain_mean
    assert isinstance(resolve_rule("fedquant.aggregate:ErrorWeighted"), ErrorWeighted)


# -------------------------------------------------------- aggregate_tensors checks


def test_aggregate_rejects_zero_clients() -> None:
    with pytest.raises(ValueError, match="zero clients"):
        aggregate_tensors([], mse=[], num_examples=[], rule=plain_mean)


def test_aggregate_rejects_mismatched_names_and_lengths() -> None:
    clients, mse, n = _replies(k=3)
    del clients[2]["conv.bias"]
    with pytest.raises(ValueError, match=r"client 2 tensors.*missing \['conv.bias'\]"):
        aggregate_tensors(clients, mse=mse, num_examples=n, rule=plain_mean)
    clients, mse, n = _replies(k=3)
    mse[1]["extra"] = 0.1
    with pytest.raises(ValueError, match=r"client 1 mse.*extra \['extra'\]"):
        aggregate_tensors(clients, mse=mse, num_examples=n, rule=plain_mean)
    with pytest.raises(ValueError, match="3 clients"):
        aggregate_tensors(clients, mse=mse[:2], num_examples=n, rule=plain_mean)
    clients, mse, n = _replies(k=3)
    clients[1]["conv.bias"] = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="'conv.bias'.*client 1 has shape"):
        aggregate_tensors(clients, mse=mse, num_examples=n, rule=plain_mean)
    clients, mse, n = _replies(k=3)
    with pytest.raises(ValueError, match="ints"):
        bad_counts: list = [1.5, 2, 3]  # not ints
        aggregate_tensors(clients, mse=mse, num_examples=bad_counts, rule=plain_mean)


def _wrong_shape(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1).mean(axis=1)


def _nan(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> np.ndarray:
    return np.full(values.shape[1:], np.nan)


def _not_numeric(values: np.ndarray, *, mse: np.ndarray, num_examples: np.ndarray) -> object:
    return np.full(values.shape[1:], None, dtype=object)


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        (_wrong_shape, "rule _wrong_shape returned shape"),
        (_nan, "rule _nan returned non-finite values for tensor 'conv.weight'"),
        (_not_numeric, "rule _not_numeric returned dtype object"),
    ],
)
def test_aggregate_validates_rule_output(rule: AggregationRule, match: str) -> None:
    clients, mse, n = _replies()
    with pytest.raises(ValueError, match=match):
        aggregate_tensors(clients, mse=mse, num_examples=n, rule=rule)


def test_rule_errors_carry_the_tensor_name() -> None:
    clients, mse, _ = _replies(k=2)
    with pytest.raises(ValueError, match="sum to > 0") as err:
        aggregate_tensors(clients, mse=mse, num_examples=[0, 0], rule=sample_weighted)
    assert any("conv.weight" in note for note in err.value.__notes__)


def test_float64_inputs_give_float32_outputs() -> None:
    clients = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 4.0])}]
    mse = [{"w": 0.1}, {"w": 0.1}]
    out = aggregate_tensors(clients, mse=mse, num_examples=[1, 1], rule=plain_mean)
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], [2.0, 3.0])
