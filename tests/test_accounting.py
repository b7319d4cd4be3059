"""Cumulative RDP accounting against Opacus' published value and its own analysis."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedquant.accounting import (
    PRV_EPS_ERROR,
    Accountant,
    MechanismStep,
    PrivacyLedger,
    calibrate_noise,
)
from fedquant.checks import is_finite, is_int, is_real

DELTA = 1e-5
RDP = Accountant.RDP


def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε recomputed from raw (σ, q, steps) with Opacus' analysis, summed over entries."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(
        compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        for sigma, q, steps in history
    )
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def test_published_opacus_value() -> None:
    # opacus/tests/accountants_test.py: σ = 1.5, q = 0.04, 90 epochs, δ = 1e-5.
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=1.5, sample_rate=0.04, steps=int(90 / 0.04))
    assert ledger.history == (MechanismStep(1.5, 0.04, 2250),)
    assert ledger.epsilon(delta=DELTA, accountant=RDP) == pytest.approx(7.32911117143, rel=1e-6)


def test_empty_history_spends_nothing() -> None:
    assert PrivacyLedger().epsilon(delta=DELTA, accountant=RDP) == 0.0
    assert PrivacyLedger().to_dict() == {"noise": [], "rate": [], "steps": []}


def test_matches_independent_recomputation_with_estimator_entries() -> None:
    ledger = PrivacyLedger()
    raw: list[tuple[float, float, int]] = []
    for _ in range(3):  # rounds: training steps, then one estimator query
        ledger.record(noise_multiplier=1.1, sample_rate=0.01, steps=300)
        ledger.record(noise_multiplier=3.0, sample_rate=0.05, steps=1)
        raw += [(1.1, 0.01, 300), (3.0, 0.05, 1)]
    assert len(ledger) == 6  # no merging across different (σ, q)
    expected = _independent_epsilon(raw, DELTA)
    assert ledger.epsilon(delta=DELTA, accountant=RDP) == pytest.approx(expected, rel=1e-12)
    # The estimator entries cost something: more than the training entries alone.
    training_only = _independent_epsilon([(1.1, 0.01, 900)], DELTA)
    assert expected > training_only
    # And an extra hypothetical entry through epsilon_if.
    extra = MechanismStep(0.8, 0.02, 50)
    assert ledger.epsilon_if(extra, delta=DELTA, accountant=RDP) == pytest.approx(
        _independent_epsilon([*raw, (0.8, 0.02, 50)], DELTA), rel=1e-12
    )
    assert len(ledger) == 6  # epsilon_if leaves the ledger unchanged


def test_matches_opacus_rdp_accountant_stepping() -> None:
    accountant = RDPAccountant()
    ledger = PrivacyLedger()
    for sigma, q, steps in [(1.0, 0.02, 40), (2.5, 0.05, 1), (1.0, 0.02, 40)]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
        ledger.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    assert [MechanismStep(*h) for h in accountant.history] == list(ledger.history)
    assert ledger.epsilon(delta=DELTA, accountant=RDP) == pytest.approx(
        accountant.get_epsilon(delta=DELTA), rel=1e-12
    )


def test_epsilon_is_cumulative_across_rounds_and_restarts() -> None:
    sigma, q, steps, rounds = 1.2, 0.02, 150, 6
    one_entry = PrivacyLedger([MechanismStep(sigma, q, rounds * steps)]).epsilon(
        delta=DELTA, accountant=RDP
    )

    uninterrupted = PrivacyLedger()
    stored = PrivacyLedger().to_dict()
    per_round = []
    for _ in range(rounds):
        uninterrupted.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
        restored = PrivacyLedger.from_dict(stored)  # a fresh client process each round
        restored.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
        stored = restored.to_dict()
        per_round.append(restored.epsilon(delta=DELTA, accountant=RDP))

    assert uninterrupted.history == (MechanismStep(sigma, q, rounds * steps),)
    assert uninterrupted.epsilon(delta=DELTA, accountant=RDP) == one_entry
    assert PrivacyLedger.from_dict(stored).epsilon(delta=DELTA, accountant=RDP) == one_entry
    assert per_round == sorted(per_round) and per_round[0] < per_round[-1]  # grows
    # Not a per-round budget: the last round's ε is well above a single round's.
    single_round = PrivacyLedger([MechanismStep(sigma, q, steps)]).epsilon(
        delta=DELTA, accountant=RDP
    )
    assert per_round[-1] > 1.5 * single_round


def test_interleaved_estimator_restart_equals_uninterrupted() -> None:
    uninterrupted = PrivacyLedger()
    stored = PrivacyLedger().to_dict()
    for _ in range(4):
        for ledger in (uninterrupted, restored := PrivacyLedger.from_dict(stored)):
            ledger.record(noise_multiplier=0.9, sample_rate=0.01, steps=100)
            ledger.record(noise_multiplier=3.0, sample_rate=0.05, steps=1)
        stored = restored.to_dict()
    assert PrivacyLedger.from_dict(stored) == uninterrupted
    assert PrivacyLedger.from_dict(stored).epsilon(
        delta=DELTA, accountant=RDP
    ) == uninterrupted.epsilon(delta=DELTA, accountant=RDP)


def test_to_dict_is_plain_lists() -> None:
    ledger = PrivacyLedger([MechanismStep(np.float32(1.5), np.float64(0.04), np.int64(7))])
    d = ledger.to_dict()
    assert d == {"noise": [1.5], "rate": [0.04], "steps": [7]}
    assert type(d["noise"][0]) is float and type(d["steps"][0]) is int


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "field"),
    [
        (0.0, 0.1, 1, "noise_multiplier"),
        (-1.0, 0.1, 1, "noise_multiplier"),
        (math.inf, 0.1, 1, "noise_multiplier"),
        (math.nan, 0.1, 1, "noise_multiplier"),
        (True, 0.1, 1, "noise_multiplier"),
        (1.0, 0.0, 1, "sample_rate"),
        (1.0, 1.5, 1, "sample_rate"),
        (1.0, 0.1, 0, "steps"),
        (1.0, 0.1, 2.0, "steps"),
        (1.0, 0.1, True, "steps"),
    ],
)
def test_mechanism_step_validation(sigma: float, q: float, steps: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MechanismStep(sigma, q, steps)


@pytest.mark.parametrize(
    ("value", "real", "integral", "finite"),
    [
        (3, True, True, True),
        (np.int64(3), True, True, True),
        (1.5, True, False, True),
        (np.float32(1.5), True, False, True),
        (Fraction(1, 3), True, False, True),
        (10**400, True, True, False),  # beyond float range: float() overflows
        (math.inf, True, False, False),
        (math.nan, True, False, False),
        (True, False, False, False),  # a bool is an int to Python, never a number here
        (np.bool_(True), False, False, False),
        ("1", False, False, False),
        (None, False, False, False),
        ([1.0], False, False, False),
        (1 + 0j, False, False, False),
    ],
)
def test_number_checks(value: object, real: bool, integral: bool, finite: bool) -> None:
    assert (is_real(value), is_int(value), is_finite(value)) == (real, integral, finite)


def test_epsilon_rejects_bad_delta() -> None:
    ledger = PrivacyLedger([MechanismStep(1.0, 0.1, 10)])
    for delta in (0.0, 1.0, -1e-5, math.nan):
        with pytest.raises(ValueError, match="delta"):
            ledger.epsilon(delta=delta, accountant=RDP)


def test_calibrate_noise_meets_target_within_tol() -> None:
    q, steps = 0.01, 1000
    sigmas = []
    for target in (1.0, 3.0, 8.0):
        sigma = calibrate_noise(
            target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=RDP
        )
        eps = PrivacyLedger([MechanismStep(sigma, q, steps)]).epsilon(delta=DELTA, accountant=RDP)
        assert target - 1e-3 <= eps <= target
        sigmas.append(sigma)
    assert sigmas[0] > sigmas[1] > sigmas[2]  # higher target, less noise
    # Smallest such σ: a slightly smaller one overshoots.
    sigma = sigmas[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            PrivacyLedger([MechanismStep(sigma * 0.99, q, steps)]).epsilon(
                delta=DELTA, accountant=RDP
            )
            > 3.0
        )


def test_calibrate_noise_with_extra_queries_needs_more_noise() -> None:
    q, steps, target = 0.01, 1000, 2.0
    extra = [MechanismStep(3.0, 0.05, 10)]
    plain = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, accountant=RDP
    )
    with_extra = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, extra=extra, accountant=RDP
    )
    assert with_extra > plain
    total = PrivacyLedger([MechanismStep(with_extra, q, steps), *extra]).epsilon(
        delta=DELTA, accountant=RDP
    )
    assert target - 1e-3 <= total <= target


def test_calibrate_noise_impossible_targets() -> None:
    extra = [MechanismStep(0.5, 0.5, 100)]  # spends far more than 1.0 by itself
    with pytest.raises(ValueError, match="estimator queries alone spend"):
        calibrate_noise(
            target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=10, extra=extra, accountant=RDP
        )
    with pytest.raises(ValueError, match="even at noise multiplier 2"):
        calibrate_noise(
            target_epsilon=0.01,
            delta=DELTA,
            sample_rate=1.0,
            steps=100,
            max_noise=2.0,
            accountant=RDP,
        )
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(
            target_epsilon=-1.0, delta=DELTA, sample_rate=0.01, steps=10, accountant=RDP
        )
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(target_epsilon=1.0, delta=DELTA, sample_rate=0.0, steps=10, accountant=RDP)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ([], "must be a mapping"),
        ({"noise": [1.0], "rate": [0.1]}, "exactly the keys"),
        ({"noise": [1.0], "rate": [0.1], "steps": [1], "extra": []}, "exactly the keys"),
        ({"noise": [1.0, 2.0], "rate": [0.1], "steps": [1]}, "equal lengths"),
        ({"noise": "1.0", "rate": [0.1], "steps": [1]}, "`noise` must be a list"),
        ({"noise": [1.0], "rate": [0.1], "steps": [1.5]}, "entry 0: `steps`"),
        ({"noise": [1.0], "rate": [1.1], "steps": [1]}, "entry 0: `sample_rate`"),
        ({"noise": [0.0], "rate": [0.1], "steps": [1]}, "entry 0: `noise_multiplier`"),
        ({"noise": [None], "rate": [0.1], "steps": [1]}, "entry 0: `noise_multiplier`"),
        ({"noise": [10**400], "rate": [0.1], "steps": [1]}, "entry 0: `noise_multiplier`"),
        ({"noise": [[1.0]], "rate": [0.1], "steps": [1]}, "entry 0: `noise_multiplier`"),
    ],
)
def test_from_dict_rejects_malformed(bad: object, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PrivacyLedger.from_dict(bad)  # type: ignore[arg-type]


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4), st.tuples(_scalars, _scalars))
_keys = st.one_of(st.sampled_from(["noise", "rate", "steps"]), st.text(max_size=5), st.integers())


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.dictionaries(_keys, _values, max_size=4),
        st.fixed_dictionaries(
            {k: st.lists(_scalars, max_size=3) for k in ("noise", "rate", "steps")}
        ),
        st.fixed_dictionaries(
            {
                "noise": st.lists(st.floats(min_value=-1, max_value=10), min_size=2, max_size=2),
                "rate": st.lists(st.floats(min_value=-0.5, max_value=1.5), min_size=2, max_size=2),
                "steps": st.lists(
                    st.integers(min_value=-2, max_value=10**6), min_size=2, max_size=2
                ),
            }
        ),
    )
)
def test_from_dict_property(d: dict) -> None:
    try:
        ledger = PrivacyLedger.from_dict(d)
    except ValueError:
        return
    assert PrivacyLedger.from_dict(ledger.to_dict()) == ledger
    assert all(isinstance(e, MechanismStep) for e in ledger.history)


# ---------------------------------------------------------------- PRV accountant
PRV = Accountant.PRV
ROUNDS_HISTORY = [(1.1, 0.01, 300), (3.0, 0.05, 1)] * 3  # training, then an estimator query


def _opacus_prv(history: list[tuple[float, float, int]]) -> PRVAccountant:
    accountant = PRVAccountant()
    accountant.history = list(history)
    return accountant


def test_prv_equals_opacus_prv_accountant_on_the_same_history() -> None:
    ledger = PrivacyLedger([MechanismStep(*h) for h in ROUNDS_HISTORY])
    eps = ledger.epsilon(delta=DELTA, accountant=PRV)
    # Grouped by (σ, q) the history is Opacus' own two-entry history: the same numbers.
    grouped = [(1.1, 0.01, 900), (3.0, 0.05, 3)]
    assert eps == pytest.approx(_opacus_prv(grouped).get_epsilon(delta=DELTA), rel=1e-12)
    # Opacus stepping through the rounds one entry at a time: the same bound within its
    # discretisation error ε_err.
    stepped = _opacus_prv(ROUNDS_HISTORY).get_epsilon(delta=DELTA)
    assert abs(eps - stepped) <= PRV_EPS_ERROR
    # The order in which the rounds interleaved the entries does not matter.
    shuffled = PrivacyLedger([MechanismStep(*h) for h in reversed(ROUNDS_HISTORY)])
    assert shuffled.epsilon(delta=DELTA, accountant=PRV) == eps


def test_prv_reports_its_upper_bound_and_is_tighter_than_rdp() -> None:
    grouped = [(1.1, 0.01, 900), (3.0, 0.05, 3)]
    dprv = _opacus_prv(grouped)._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=DELTA / 1000)
    lower, estimate, upper = dprv.compute_epsilon(DELTA, DELTA / 1000, PRV_EPS_ERROR)
    ledger = PrivacyLedger([MechanismStep(*h) for h in grouped])
    eps = ledger.epsilon(delta=DELTA, accountant=PRV)
    assert eps == pytest.approx(upper, rel=1e-12)
    assert lower < estimate < eps
    # Published comparisons (Gopi et al. 2021, Fig. 1): PRV well below RDP for DP-SGD.
    rdp = ledger.epsilon(delta=DELTA, accountant=RDP)
    assert 0.6 * rdp < eps < 0.95 * rdp


@pytest.mark.parametrize("target", [1.0, 2.0, 8.0])
def test_prv_calibration_meets_target_with_less_noise_than_rdp(target: float) -> None:
    q, steps, extra = 0.0128, 400, [MechanismStep(3.0, 0.05, 10)]
    sigma_prv, sigma_rdp = (
        calibrate_noise(
            target_epsilon=target,
            delta=DELTA,
            sample_rate=q,
            steps=steps,
            extra=extra,
            accountant=accountant,
        )
        for accountant in (PRV, RDP)
    )
    eps = PrivacyLedger([MechanismStep(sigma_prv, q, steps), *extra]).epsilon(
        delta=DELTA, accountant=PRV
    )
    assert target - 1e-3 <= eps <= target
    # Checked by Opacus' PRVAccountant itself, on the same history.
    opacus = _opacus_prv([(sigma_prv, q, steps), (3.0, 0.05, 10)]).get_epsilon(delta=DELTA)
    assert opacus <= target + 1e-9
    assert 0.8 * sigma_rdp < sigma_prv < sigma_rdp
