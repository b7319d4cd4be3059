"""DPQuant scheduling, sensitivity estimator and throughput formula (paper A)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from torch import nn

from fedquant.config import DPQuantSettings, RunConfig
from fedquant.dpquant import (
    LayerScheduler,
    QuantPolicy,
    estimate_sensitivity,
    estimator_flops,
    layer_flops,
    num_quantized,
    sample_layers,
    selection_probabilities,
    theoretical_speedup,
)

# --------------------------------------------------------------------------- helpers


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _successive_subset_probabilities(p: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """Exact P(subset) of successive sampling without replacement, by enumerating orders."""
    probs: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + prob
    return probs


def _subset_counts(draws: list[list[int]], subsets: list[tuple[int, ...]]) -> np.ndarray:
    index = {s: j for j, s in enumerate(subsets)}
    counts = np.zeros(len(subsets))
    for d in draws:
        counts[index[tuple(d)]] += 1
    return counts


# --------------------------------------------------------------------------- k, π, sampling


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [(10, 0.9, 9), (10, 0.5, 5), (5, 0.5, 3), (5, 0.7, 4), (5, 0.1, 1), (4, 0.0, 0), (4, 1.0, 4)],
)
def test_num_quantized(n: int, ratio: float, k: int) -> None:
    assert num_quantized(n, ratio) == k


@pytest.mark.parametrize(
    ("n", "ratio", "field"),
    [
        (4, -0.1, "ratio"),
        (4, 1.1, "ratio"),
        (4, math.nan, "ratio"),
        (-1, 0.5, "n_layers"),
        (2.0, 0.5, "n_layers"),
    ],
)
def test_num_quantized_rejects(n: int, ratio: float, field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        num_quantized(n, ratio)


def test_selection_probabilities_is_stable_softmax() -> None:
    L = np.array([0.0, 0.1, 0.5, 2.0])
    np.testing.assert_allclose(selection_probabilities(L, beta=5.0), _softmax(-5.0 * L))
    np.testing.assert_allclose(selection_probabilities(L, beta=0.0), np.full(4, 0.25))
    # Shifting L changes nothing; huge values neither overflow nor produce NaN.
    np.testing.assert_allclose(
        selection_probabilities(L + 1e6, beta=5.0), selection_probabilities(L, beta=5.0)
    )
    big = selection_probabilities(np.array([-1e6, 0.0, 1e6]), beta=5.0)
    np.testing.assert_array_equal(big, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="beta"):
        selection_probabilities(L, beta=-1.0)
    with pytest.raises(ValueError, match="sensitivity"):
        selection_probabilities(np.array([0.0, np.nan]), beta=1.0)


def test_sample_layers_handles_underflowed_probabilities() -> None:
    p = np.array([1.0, 0.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    draws = [sample_layers(p, 3, rng) for _ in range(200)]
    assert all(len(d) == 3 and d[0] == 0 and len(set(d)) == 3 for d in draws)
    assert {i for d in draws for i in d} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="k"):
        sample_layers(p, 5, rng)
    with pytest.raises(ValueError, match="sum to 1"):
        sample_layers(np.array([0.5, 0.6]), 1, rng)


# --------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("policy", list(QuantPolicy))
def test_exactly_k_layers_per_epoch(policy: QuantPolicy) -> None:
    n, ratio = 7, 0.5
    sched = LayerScheduler(n_layers=n, policy=policy, ratio=ratio, seed=3)
    k = 0 if policy is QuantPolicy.NONE else num_quantized(n, ratio)
    assert sched.k == k
    sched.update_sensitivity(np.linspace(0.0, 1.0, n))
    for epoch in range(30):
        chosen = sched.next_epoch()
        assert len(chosen) == k == len(set(chosen))
        assert chosen == sorted(chosen) and all(0 <= i < n for i in chosen)
        assert sched.epochs_done == epoch + 1


def test_static_never_changes_across_epochs_and_restarts() -> None:
    sched = LayerScheduler(n_layers=8, policy=QuantPolicy.STATIC, ratio=0.5, seed=11)
    first = sched.next_epoch()
    assert first == sched.static_subset and len(first) == 4
    for _ in range(5):
        sched.update_sensitivity(np.arange(8.0))  # ignored by STATIC
        sched = LayerScheduler.from_dict(sched.to_dict())
        for _ in range(4):
            assert sched.next_epoch() == first
    # The subset is a function of the seed: another seed draws (almost surely) another.
    policy = QuantPolicy.STATIC
    others = {
        tuple(LayerScheduler(n_layers=8, policy=policy, ratio=0.5, seed=s).static_subset or ())
        for s in range(10)
    }
    assert len(others) > 1


def test_random_rotates_and_covers_every_layer() -> None:
    n = 6
    sched = LayerScheduler(n_layers=n, policy=QuantPolicy.RANDOM, ratio=0.5, seed=0)
    draws = [tuple(sched.next_epoch()) for _ in range(50)]
    assert len(set(draws)) > 1
    assert {i for d in draws for i in d} == set(range(n))


def test_dpquant_k1_frequencies_match_softmax() -> None:
    L = np.array([0.0, 0.1, 0.2, 0.4, 0.8])
    beta, draws = 5.0, 20_000
    sched = LayerScheduler(n_layers=5, policy=QuantPolicy.DPQUANT, ratio=0.2, beta=beta, seed=1)
    assert sched.k == 1
    sched.update_sensitivity(L)
    sched.update_sensitivity(L)  # EMA with α = 0.5 from zeros: 0.75 L
    np.testing.assert_allclose(sched.sensitivity, 0.75 * L)
    pi = _softmax(-beta * 0.75 * L)
    counts = np.bincount([sched.next_epoch()[0] for _ in range(draws)], minlength=5)
    assert chisquare(counts, draws * pi).pvalue > 1e-3
    # The test can fail: the same counts are incompatible with uniform probabilities.
    assert chisquare(counts, np.full(5, draws / 5)).pvalue < 1e-3
    # Low-sensitivity layers are chosen more often.
    assert np.all(np.diff(counts) < 0)


def test_dpquant_k2_subsets_follow_successive_sampling() -> None:
    L = np.array([0.0, 0.15, 0.3, 0.6])
    beta, draws = 5.0, 10_000  # power against the P(S) ∝ Π π_i model below: ~1 (λ ≈ 160)
    sched = LayerScheduler(
        n_layers=4, policy=QuantPolicy.DPQUANT, ratio=0.5, beta=beta, alpha=1.0, seed=2
    )
    sched.update_sensitivity(L)
    pi = _softmax(-beta * L)
    np.testing.assert_allclose(sched.probabilities(), pi)
    exact = _successive_subset_probabilities(pi, 2)
    subsets = sorted(exact)
    rng = np.random.default_rng(2)
    counts = _subset_counts([sample_layers(pi, 2, rng) for _ in range(draws)], subsets)
    expected = draws * np.array([exact[s] for s in subsets])
    assert chisquare(counts, expected).pvalue > 1e-3
    # Wrong models are rejected: uniform subsets, and P(S) ∝ Π_{i∈S} π_i.
    assert chisquare(counts, np.full(len(subsets), draws / len(subsets))).pvalue < 1e-3
    product = np.array([np.prod(pi[list(s)]) for s in subsets])
    assert chisquare(counts, draws * product / product.sum()).pvalue < 1e-3
    # Inclusion frequency decreases with sensitivity.
    inclusion = [sum(c for s, c in zip(subsets, counts, strict=True) if i in s) for i in range(4)]
    assert inclusion == sorted(inclusion, reverse=True)


def test_sample_layers_first_draw_follows_pi() -> None:
    # k = 1 through the free function, against π directly.
    pi = np.array([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(7)
    counts = np.bincount([sample_layers(pi, 1, rng)[0] for _ in range(10_000)], minlength=4)
    assert chisquare(counts, 10_000 * pi).pvalue > 1e-3


def test_schedule_is_reproducible_across_restarts() -> None:
    def run(restart_every: int | None) -> list[list[int]]:
        sched = LayerScheduler(n_layers=6, policy=QuantPolicy.DPQUANT, ratio=0.5, seed=5)
        out = []
        for epoch in range(12):
            if epoch % 2 == 0:
                sched.update_sensitivity(np.sin(np.arange(6.0) + epoch))
            out.append(sched.next_epoch())
            if restart_every and (epoch + 1) % restart_every == 0:
                sched = LayerScheduler.from_dict(sched.to_dict())
        return out

    uninterrupted = run(None)
    assert run(1) == uninterrupted
    assert run(3) == uninterrupted
    assert len({tuple(s) for s in uninterrupted}) > 1


def test_update_sensitivity_is_an_ema() -> None:
    sched = LayerScheduler(n_layers=3, policy=QuantPolicy.DPQUANT, ratio=0.4, alpha=0.25)
    np.testing.assert_array_equal(sched.sensitivity, np.zeros(3))
    np.testing.assert_allclose(sched.probabilities(), np.full(3, 1 / 3))
    r1, r2 = np.array([1.0, -2.0, 4.0]), np.array([0.0, 2.0, 8.0])
    sched.update_sensitivity(r1)
    sched.update_sensitivity(r2)
    np.testing.assert_allclose(sched.sensitivity, 0.75 * (0.25 * r1) + 0.25 * r2)
    with pytest.raises(ValueError, match="estimate"):
        sched.update_sensitivity(np.zeros(4))
    with pytest.raises(ValueError, match="estimate"):
        sched.update_sensitivity(np.array([0.0, np.inf, 0.0]))


def test_scheduler_takes_its_constants_from_the_run_config() -> None:
    """One source: a run's DPQuantSettings, whose defaults are also the scheduler's."""
    settings = RunConfig.from_flower(
        {
            "quant-policy": "random",
            "quant-train-ratio": 0.75,
            "dpquant-beta": 20.0,
            "dpquant-alpha": 0.25,
        }
    ).dpquant
    sched = LayerScheduler.from_settings(settings, n_layers=8, seed=4)
    assert (sched.policy, sched.ratio, sched.beta, sched.alpha, sched.seed) == (
        QuantPolicy.RANDOM,
        0.75,
        20.0,
        0.25,
        4,
    )
    assert sched.k == 6 and sched.epochs_done == 0
    np.testing.assert_array_equal(sched.sensitivity, np.zeros(8))
    defaults = DPQuantSettings()
    bare = LayerScheduler(n_layers=8, policy=QuantPolicy.DPQUANT, ratio=0.5)
    assert (bare.beta, bare.alpha) == (defaults.beta, defaults.alpha)
    # The overrides differ from the defaults: the first check tells the two apart.
    assert (bare.beta, bare.alpha) != (settings.beta, settings.alpha)


def test_to_dict_is_plain_and_round_trips() -> None:
    sched = LayerScheduler(n_layers=4, policy=QuantPolicy.STATIC, ratio=0.5, seed=9)
    sched.update_sensitivity(np.array([0.1, 0.2, 0.3, 0.4]))
    sched.next_epoch()
    d = sched.to_dict()
    assert d["policy"] == "static" and d["epochs_done"] == 1
    plain = (int, float, str)
    assert all(
        isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))
        for v in d.values()
    )
    assert LayerScheduler.from_dict(d).to_dict() == d


@pytest.mark.parametrize(
    "change",
    [
        {"policy": "fancy"},
        {"policy": 1},
        {"ratio": 1.5},
        {"ratio": "0.5"},
        {"alpha": 0.0},
        {"beta": -1.0},
        {"seed": -1},
        {"seed": 1.0},
        {"n_layers": 0},
        {"epochs_done": -3},
        {"sensitivity": [0.0, 0.0]},
        {"sensitivity": [0.0, None, 0.0, 0.0]},
        {"sensitivity": "0000"},
        {"static_subset": [0, 0]},
        {"static_subset": [0, 4]},
        {"static_subset": [0]},
        {"extra": 1},
    ],
)
def test_scheduler_from_dict_rejects_malformed(change: dict) -> None:
    d = LayerScheduler(n_layers=4, policy=QuantPolicy.STATIC, ratio=0.5).to_dict()
    d.update(change)
    (key,) = change
    named = "exactly the keys" if key == "extra" else f"`{key}`"  # the error names the field
    with pytest.raises(ValueError, match=named):
        LayerScheduler.from_dict(d)


_any = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-3, 6), st.floats(), st.none()), max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_scheduler_from_dict_property(data: st.DataObject) -> None:
    d = LayerScheduler(n_layers=4, policy=QuantPolicy.DPQUANT, ratio=0.5).to_dict()
    for key in data.draw(st.lists(st.sampled_from(sorted(d)), max_size=3)):
        d[key] = data.draw(_any)
    try:
        sched = LayerScheduler.from_dict(d)
    except ValueError:
        return
    assert len(sched.next_epoch()) == sched.k


# --------------------------------------------------------------------------- estimator

N_LAYERS = 3


def _synthetic(scale: np.ndarray, calls: list[int] | None = None):
    """Losses of x (N, n): loss_fp = ‖x‖², loss_i = loss_fp + scale_i · x_i; r(x) = scale · x."""
    s = torch.as_tensor(scale, dtype=torch.float64)

    def losses(layer: int | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if calls is not None and layer is None:
            calls.append(x.shape[0])
        base = (x**2).sum(dim=1)
        return base if layer is None else base + s[layer] * x[:, layer]

    return losses


def _data(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, N_LAYERS, generator=g, dtype=torch.float64) * torch.tensor([0.2, 0.5, 1.0])
    return x, torch.zeros(n, dtype=torch.long)


def _estimate(losses, x, y, *, seed: int, q: float = 0.5, clip: float = 1.0, sigma: float = 2.0):
    return estimate_sensitivity(
        losses,
        x,
        y,
        n_layers=N_LAYERS,
        sample_rate=q,
        clip=clip,
        noise_multiplier=sigma,
        generator=torch.Generator().manual_seed(seed),
    )


def test_estimator_shape_noise_and_determinism() -> None:
    x, y = _data()
    losses = _synthetic(np.ones(N_LAYERS))
    a = _estimate(losses, x, y, seed=1)
    assert a.shape == (N_LAYERS,) and a.dtype == np.float64
    np.testing.assert_array_equal(a, _estimate(losses, x, y, seed=1))
    assert not np.allclose(a, _estimate(losses, x, y, seed=2))


def test_estimator_without_noise_is_mean_clipped_difference() -> None:
    x, y = _data()
    scale = np.array([0.5, 1.0, 2.0])
    r = x.numpy() * scale  # (N, n): true per-example differences
    clip = 1.0
    norms = np.linalg.norm(r, axis=1, keepdims=True)
    clipped = r * np.minimum(1.0, clip / norms)
    assert np.any(norms > clip) and np.any(norms < clip)  # both branches exercised
    est = _estimate(_synthetic(scale), x, y, seed=0, q=1.0, clip=clip, sigma=1e-9)
    np.testing.assert_allclose(est, clipped.mean(axis=0), rtol=1e-6, atol=1e-9)
    # Large sensitivity layers get large R̂.
    assert est[0] < est[1] < est[2]


def test_estimator_clipping_bounds_each_contribution() -> None:
    x, y = _data()
    calls: list[int] = []
    q, clip = 0.3, 0.7
    huge = _synthetic(np.full(N_LAYERS, 1e6), calls)
    est = _estimate(huge, x, y, seed=4, q=q, clip=clip, sigma=0)
    (batch,) = calls
    total = est * q * len(x)  # Σ clipped r(x)
    # Every r(x) is positive and clipped to norm C_a: the sum has norm ≤ |B|·C_a, and
    # since all point into the positive orthant it is close to that bound.
    assert np.linalg.norm(total) <= batch * clip * (1 + 1e-9)
    assert np.linalg.norm(total) > 0.8 * batch * clip
    # Oracle: each r(x) = 1e6 · x is clipped to C_a · x / ‖x‖ (all are far above C_a), and
    # B is the Poisson subsample drawn first from the generator (keep u < q_a).
    keep = torch.rand(len(x), generator=torch.Generator().manual_seed(4)) < q
    assert int(keep.sum()) == batch
    unit = x[keep] / torch.linalg.vector_norm(x[keep], dim=1, keepdim=True)
    np.testing.assert_allclose(total, clip * unit.sum(dim=0).numpy(), rtol=1e-9)


def test_estimator_subsample_and_noise_statistics() -> None:
    x, y = _data(n=200)
    calls: list[int] = []
    zero = lambda layer, xb, yb: torch.zeros(xb.shape[0])  # noqa: E731  r(x) = 0
    counted = _synthetic(np.zeros(N_LAYERS), calls)
    q, clip, sigma, reps = 0.1, 0.5, 3.0, 1500
    noise = np.stack(
        [_estimate(zero, x, y, seed=s, q=q, clip=clip, sigma=sigma) for s in range(reps)]
    )
    for s in range(300):
        _estimate(counted, x, y, seed=s, q=q, clip=clip, sigma=sigma)
    # R̂ = N(0, σ²C²) / (q|D|) per coordinate: std within ~5 standard errors (SE ≈ 1.1%).
    expected_std = sigma * clip / (q * len(x))
    assert np.std(noise) == pytest.approx(expected_std, rel=0.06)
    assert abs(np.mean(noise)) < 5 * expected_std / math.sqrt(noise.size)
    # Poisson subsample: mean size q|D| = 20, std sqrt(|D| q (1-q)) / sqrt(runs).
    se = math.sqrt(len(x) * q * (1 - q) / len(calls))
    assert abs(np.mean(calls) - q * len(x)) < 5 * se


def test_estimator_empty_subsample_still_adds_noise() -> None:
    x, y = _data(n=3)
    calls: list[int] = []
    est = _estimate(_synthetic(np.ones(N_LAYERS), calls), x, y, seed=0, q=1e-9, sigma=1.0)
    assert calls == []  # nothing sampled, no forward pass
    assert np.all(est != 0) and np.all(np.isfinite(est))


def test_estimator_validates_inputs() -> None:
    x, y = _data(n=50)
    bad_shape = lambda layer, xb, yb: torch.zeros(xb.shape[0], 2)  # noqa: E731
    with pytest.raises(ValueError, match="shape"):
        _estimate(bad_shape, x, y, seed=0, q=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        _estimate(_synthetic(np.ones(3)), x, y, seed=0, q=0.0)
    with pytest.raises(ValueError, match="clip"):
        _estimate(_synthetic(np.ones(3)), x, y, seed=0, clip=-1.0)
    with pytest.raises(ValueError, match="examples"):
        _estimate(_synthetic(np.ones(3)), x, y[:10], seed=0)


def test_estimator_with_a_real_model() -> None:
    """End to end on a tiny MLP, 'quantizing' a layer by rounding its weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    layers = [model[0], model[2]]
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    def losses(layer: int | None, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if layer is None:
            return loss_fn(model(xb), yb)
        w = layers[layer].weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.copy_(torch.round(w * 2) / 2)
        try:
            return loss_fn(model(xb), yb)
        finally:
            with torch.no_grad():
                w.copy_(saved)

    est = estimate_sensitivity(
        losses,
        x,
        y,
        n_layers=2,
        sample_rate=1.0,
        clip=10.0,
        noise_multiplier=1e-12,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        direct = torch.stack([losses(i, x, y) - losses(None, x, y) for i in range(2)], dim=1)
    assert float(direct.norm(dim=1).max()) < 10.0  # no clipping at C_a = 10
    np.testing.assert_allclose(est, direct.mean(dim=0).numpy(), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- throughput


def test_theoretical_speedup_headline_and_boundaries() -> None:
    flops = [10.0, 30.0, 50.0, 10.0]
    # p = 0.9 of the FLOPs quantized (layers 1, 2, 0), s = 4: 1 / (0.1 + 0.9/4).
    assert theoretical_speedup(flops, [0, 1, 2]) == pytest.approx(1 / (0.1 + 0.9 / 4))
    assert theoretical_speedup(flops, [0, 1, 2]) == pytest.approx(3.0769, abs=1e-4)
    assert theoretical_speedup(flops, []) == 1.0
    assert theoretical_speedup(flops, [0, 1, 2, 3]) == pytest.approx(4.0)
    assert theoretical_speedup(flops, [0, 1, 2, 3], low_precision_speedup=1.0) == 1.0
    # FLOP-weighted p: one big layer counts more than one small one.
    assert theoretical_speedup(flops, [2]) > theoretical_speedup(flops, [3])
    # Analysis cost lowers the speedup, and with nothing quantized drops below 1.
    with_analysis = theoretical_speedup(flops, [0, 1, 2], analysis_flops=20.0)
    assert with_analysis == pytest.approx(100 / (20 + 0.325 * 100))
    assert with_analysis < theoretical_speedup(flops, [0, 1, 2])
    assert theoretical_speedup(flops, [], analysis_flops=5.0) == pytest.approx(100 / 105)
    # Non-quantizable FLOPs dilute it: T = (0.1 + 0.225)·100 + 100.
    assert theoretical_speedup(flops, [0, 1, 2], other_flops=100.0) == pytest.approx(200 / 132.5)


@pytest.mark.parametrize(
    ("flops", "quantized", "kwargs", "field"),
    [
        ([], [], {}, "flops"),
        ([0.0, 0.0], [], {}, "flops"),
        ([1.0, -1.0], [], {}, "flops"),
        ([1.0, 2.0], [2], {}, "quantized"),
        ([1.0, 2.0], [0, 0], {}, "quantized"),
        ([1.0, 2.0], [0], {"low_precision_speedup": 0.0}, "low_precision_speedup"),
        ([1.0, 2.0], [0], {"analysis_flops": -1.0}, "analysis_flops"),
    ],
)
def test_theoretical_speedup_rejects(
    flops: list[float], quantized: list[int], kwargs: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        theoretical_speedup(flops, quantized, **kwargs)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3)  # (1, 8, 8) -> (4, 6, 6)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, kernel_size=3, stride=2, groups=2)  # -> (8, 2, 2)
        self.fc = nn.Linear(32, 10)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def test_layer_flops_hand_computed() -> None:
    model = _Tiny().train()
    running_mean = model.bn.running_mean.clone()
    layers = [model.conv1, model.conv2, model.fc]
    expected = [
        4 * 1 * 3 * 3 * 6 * 6,  # C_out · C_in/groups · kh · kw · H_out · W_out = 1296
        8 * (4 // 2) * 3 * 3 * 2 * 2,  # 576
        32 * 10,  # in · out = 320
    ]
    assert layer_flops(model, layers, torch.randn(1, 1, 8, 8)) == expected
    assert layer_flops(model, layers, torch.randn(5, 1, 8, 8)) == expected  # per example
    # Measuring leaves the model as it was: train mode, BatchNorm statistics untouched.
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, running_mean)
    assert not model.conv1._forward_hooks
    with pytest.raises(ValueError, match="not called"):
        layer_flops(model, [model.unused], torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        layer_flops(model, [model.bn], torch.randn(1, 1, 8, 8))


def test_estimator_flops() -> None:
    flops = [1296.0, 576.0, 320.0]
    expected = 4 * 2192.0 * 0.05 * 1000
    assert estimator_flops(flops, n_examples=1000, sample_rate=0.05) == pytest.approx(expected)
