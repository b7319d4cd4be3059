"""Cumulative accounting of a client's Sampled Gaussian Mechanism applications.

Every DP-SGD step, and every DPQuant sensitivity estimate (PAPERS.md, section A), is one
application of the Sampled Gaussian Mechanism (SGM): Poisson subsampling with rate q,
a sum of contributions clipped to L2 norm C, plus N(0, σ²C²I). A client's privacy
history is the list of (σ, q, steps) entries it has run. The history persists across
FL rounds (the caller stores :meth:`PrivacyLedger.to_dict` in its node state), so the ε
reported is cumulative over the whole run, never per round.

The history is analysed by one of Opacus' two accountants, used as they are
(:class:`Accountant`):

* ``RDP``: RDP of the SGM at each order α (Mironov, "Rényi Differential Privacy", CSF
  2017; Mironov, Talwar, Zhang, arXiv 1908.10530, 2019), added up over entries
  (Mironov 2017, Proposition 1) and converted to (ε, δ) (Balle et al., AISTATS 2020,
  Theorem 21), minimised over ``RDPAccountant.DEFAULT_ALPHAS``: exactly the ε of an
  ``opacus.accountants.RDPAccountant`` that ran the same steps.
* ``PRV``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz,
  "Numerical Composition of Differential Privacy", NeurIPS 2021), Opacus'
  ``PRVAccountant``. It reports its *upper* bound ε_up = ε̂(δ − δ_err) + ε_err
  (Gopi et al., Theorem 5.5) with ε_err = ``PRV_EPS_ERROR`` and δ_err = δ / 1000, so the
  guarantee holds at δ despite the discretisation. 10-25% below RDP for the same history
  (RDP's conversion to (ε, δ) is lossy), i.e. less noise for the same target.

Both compose entries in any order, so a history is grouped by (σ, q) first: the same
multiset of steps gives the same ε however the rounds interleaved them.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# isort: off
import fedquant._opacus  # noqa: F401  (before Opacus: drops its root log handler)

# isort: on
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from threadpoolctl import threadpool_limits

from fedquant.checks import is_finite, is_int, is_real
from fedquant.config import Accountant

__all__ = ["Accountant", "MechanismStep", "PrivacyLedger", "calibrate_noise", "check_target"]


PRV_EPS_ERROR = 0.01
"""ε_err of the PRV accountant (Opacus' default): the reported ε is ε̂ + ε_err at most."""

ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
"""RDP orders α at which ε is optimised: Opacus' RDPAccountant.DEFAULT_ALPHAS."""

_KEYS = ("noise", "rate", "steps")


@dataclass(frozen=True)
class MechanismStep:
    """``steps`` applications of the SGM with noise multiplier σ and Poisson rate q.

    σ is the ratio of the noise standard deviation to the L2 sensitivity (the clip norm),
    as in Opacus. Validated: σ finite and > 0, 0 < q <= 1, steps an integer >= 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if not is_finite(sigma) or sigma <= 0:
            raise ValueError(f"`noise_multiplier` must be finite and > 0. Found `{sigma!r}`.")
        if not is_finite(q) or not 0 < q <= 1:
            raise ValueError(f"`sample_rate` must be in (0, 1]. Found `{q!r}`.")
        if not is_int(steps) or steps < 1:
            raise ValueError(f"`steps` must be an integer >= 1. Found `{steps!r}`.")
        # Normalise numpy scalars to Python numbers (hashable, JSON/record friendly).
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))


@functools.lru_cache(maxsize=512)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one SGM application at every order of ``ORDERS`` (read-only array)."""
    rdp = np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS),
        dtype=np.float64,
    )
    rdp.setflags(write=False)
    return rdp


def _grouped(history: Iterable[MechanismStep]) -> tuple[MechanismStep, ...]:
    """One entry per (σ, q), summed steps, sorted: ε depends on nothing else."""
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for entry in history:
        key = (entry.noise_multiplier, entry.sample_rate)
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + entry.steps
    return tuple(MechanismStep(s, q, n) for (s, q), n in sorted(steps_by_mechanism.items()))


def _epsilon(history: Iterable[MechanismStep], delta: float, accountant: Accountant) -> float:
    """ε of the composition of ``history`` at ``delta`` (0.0 when empty)."""
    if not is_real(delta) or not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1). Found `{delta!r}`.")
    if not isinstance(accountant, Accountant):
        raise ValueError(f"`accountant` must be an Accountant. Found `{accountant!r}`.")
    grouped = _grouped(history)
    if not grouped:
        return 0.0
    if accountant is Accountant.PRV:
        return _prv_epsilon(grouped, float(delta))
    return _rdp_epsilon(grouped, float(delta))


def _rdp_epsilon(grouped: tuple[MechanismStep, ...], delta: float) -> float:
    rdp = np.zeros(len(ORDERS))
    for entry in grouped:
        rdp = rdp + _rdp_per_step(entry.noise_multiplier, entry.sample_rate) * entry.steps
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(grouped: tuple[MechanismStep, ...], delta: float) -> float:
    """Opacus' PRV upper bound ε_up (Gopi et al. 2021, Theorem 5.5).

    Cached, since a round asks for the same history twice (the budget check before
    training and the ε reported after it).

    Where the PRV discretisation fails numerically (Opacus raises for extreme
    histories, e.g. a δ too small for its domain), the RDP bound is returned: it is a
    valid, if looser, upper bound on the same ε.
    """
    prv = PRVAccountant()
    prv.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in grouped]
    try:
        # One BLAS thread: the discretisation's np.dot over ~10^4 points goes to
        # OpenBLAS' thread pool, which was seen to deadlock (spinning in exec_blas)
        # inside Flower's simulation process; at this size one thread costs nothing.
        with threadpool_limits(limits=1, user_api="blas"):
            eps = float(prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, RuntimeError, FloatingPointError, MemoryError):
        return _rdp_epsilon(grouped, delta)
    return eps if math.isfinite(eps) else _rdp_epsilon(grouped, delta)


class PrivacyLedger:
    """History of SGM applications for one client, analysed by an :class:`Accountant`.

    Consecutive
    records with the same (σ, q) merge into one entry, as in Opacus' ``RDPAccountant``.
    Persist it across rounds with :meth:`to_dict` / :meth:`from_dict`; ε is cumulative.
    """

    def __init__(self, history: Iterable[MechanismStep] = ()) -> None:
        self._history: list[MechanismStep] = []
        for entry in history:
            if not isinstance(entry, MechanismStep):
                raise ValueError(f"history entries must be MechanismStep. Found `{entry!r}`.")
            self._append(entry)

    @property
    def history(self) -> tuple[MechanismStep, ...]:
        """The recorded entries, oldest first (read-only)."""
        return tuple(self._history)

    def __len__(self) -> int:
        return len(self._history)

    def __repr__(self) -> str:
        return f"PrivacyLedger({self._history!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._history == other._history

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _append(self, entry: MechanismStep) -> None:
        if self._history:
            last = self._history[-1]
            if (last.noise_multiplier, last.sample_rate) == (
                entry.noise_multiplier,
                entry.sample_rate,
            ):
                self._history[-1] = MechanismStep(
                    last.noise_multiplier, last.sample_rate, last.steps + entry.steps
                )
                return
        self._history.append(entry)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Charge ``steps`` SGM applications (σ, q); merges with the last entry if equal."""
        self._append(MechanismStep(noise_multiplier, sample_rate, steps))

    @property
    def total_steps(self) -> int:
        """SGM applications recorded, all entries together."""
        return sum(e.steps for e in self._history)

    def epsilon(self, *, delta: float, accountant: Accountant) -> float:
        """Cumulative ε at ``delta`` of everything recorded (0.0 for an empty history)."""
        return _epsilon(self._history, delta, accountant)

    def epsilon_if(self, *extra: MechanismStep, delta: float, accountant: Accountant) -> float:
        """ε after hypothetically adding ``extra`` (a budget check before training)."""
        for entry in extra:
            if not isinstance(entry, MechanismStep):
                raise ValueError(f"extra entries must be MechanismStep. Found `{entry!r}`.")
        return _epsilon([*self._history, *extra], delta, accountant)

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """``{"noise": [σ...], "rate": [q...], "steps": [n...]}``: lists for a ConfigRecord."""
        return {
            "noise": [e.noise_multiplier for e in self._history],
            "rate": [e.sample_rate for e in self._history],
            "steps": [e.steps for e in self._history],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[object]]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; strict: any malformed input raises ``ValueError``.

        Requires exactly the keys "noise", "rate", "steps", each a list or tuple of the same
        length, of real numbers (σ, q) and integers (steps) within MechanismStep's ranges.
        The input is stored node state, possibly from disk: treated as untrusted.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a privacy ledger must be a mapping. Found `{type(d).__name__}`.")
        keys = set(d.keys())
        if keys != set(_KEYS):
            raise ValueError(
                f"a privacy ledger needs exactly the keys {list(_KEYS)}. "
                f"Found `{sorted(map(repr, keys))}`."
            )
        columns = []
        for key in _KEYS:
            column = d[key]
            if not isinstance(column, list | tuple | np.ndarray) or (
                isinstance(column, np.ndarray) and column.ndim != 1
            ):
                raise ValueError(f"`{key}` must be a list. Found `{type(column).__name__}`.")
            columns.append(list(column))
        lengths = {key: len(column) for key, column in zip(_KEYS, columns, strict=True)}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ledger lists must have equal lengths. Found `{lengths}`.")
        history = []
        for i, (sigma, q, steps) in enumerate(zip(*columns, strict=True)):
            try:
                history.append(MechanismStep(sigma, q, steps))
            except (ValueError, TypeError, OverflowError) as e:
                raise ValueError(f"ledger entry {i}: {e}") from e
        ledger = cls()
        ledger._history = history  # keep stored entries as they are (no re-merging)
        return ledger


def check_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
    extra: Sequence[MechanismStep] = (),
    max_noise: float = 1e3,
) -> None:
    """Raise ``ValueError`` unless some σ <= ``max_noise`` meets the target.

    What :func:`calibrate_noise` would raise: when ``extra`` alone already spends the
    target, or when even ``max_noise`` does not meet it (ε is decreasing in σ, so
    ε(max_noise) <= target is necessary and sufficient). Two ε evaluations, where a
    calibration takes dozens.
    """
    if not is_finite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"`target_epsilon` must be finite and > 0. Found `{target_epsilon!r}`.")
    if not is_finite(max_noise) or max_noise <= 0:
        raise ValueError(f"`max_noise` must be finite and > 0. Found `{max_noise!r}`.")
    if not isinstance(accountant, Accountant):
        raise ValueError(f"`accountant` must be an Accountant. Found `{accountant!r}`.")
    MechanismStep(1.0, sample_rate, steps)  # validates q and steps
    for entry in extra:
        if not isinstance(entry, MechanismStep):
            raise ValueError(f"extra entries must be MechanismStep. Found `{entry!r}`.")
    target = float(target_epsilon)
    with warnings.catch_warnings():  # extreme-order warnings of the RDP conversion
        warnings.simplefilter("ignore")
        spent = _epsilon(extra, delta, accountant)
        if spent >= target:
            raise ValueError(
                f"target epsilon {target} cannot be met: the estimator queries alone spend "
                f"{spent:.6g}"
            )
        floor = _epsilon(
            [MechanismStep(float(max_noise), sample_rate, steps), *extra], delta, accountant
        )
    if floor > target:
        raise ValueError(
            f"target epsilon {target} cannot be met: even at noise multiplier {max_noise} "
            f"epsilon is {floor:.6g}"
        )


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
    extra: Sequence[MechanismStep] = (),
    max_noise: float = 1e3,
    tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier σ (to ``tol`` in ε) with ε([(σ, q, steps), *extra]) <= target.

    ``extra`` are fixed queries charged to the same budget (e.g. the DPQuant estimator's
    ``MechanismStep(σ_a, q_a, calls)``); ε is the ``accountant``'s. ε is decreasing in σ,
    so σ is bracketed and then bisected: from 1, halving or doubling, under RDP; from the
    RDP answer, shrinking by 15% a step, under PRV (PRV needs 4-15% less noise, and each
    PRV evaluation costs ~0.1 s where RDP's costs ~1 ms). The result satisfies
    ``target - tol <= ε(σ) <= target``, or, where ε jumps faster than float resolution of σ
    allows, the smallest representable feasible σ found; it is never above the target
    (checked before returning).

    Raises ``ValueError`` when the target is impossible (:func:`check_target`).
    """
    budget = {
        "target_epsilon": target_epsilon,
        "delta": delta,
        "sample_rate": sample_rate,
        "steps": steps,
        "extra": extra,
        "max_noise": max_noise,
    }
    check_target(**budget, accountant=accountant)  # type: ignore[arg-type]
    if not is_finite(tol) or tol <= 0:
        raise ValueError(f"`tol` must be finite and > 0. Found `{tol!r}`.")
    target = float(target_epsilon)

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():  # extreme-order warnings while searching
            warnings.simplefilter("ignore")
            return _epsilon([MechanismStep(sigma, sample_rate, steps), *extra], delta, accountant)

    if accountant is Accountant.RDP:
        start, shrink = min(1.0, float(max_noise)), 0.5
    else:
        try:
            start = calibrate_noise(**budget, accountant=Accountant.RDP, tol=tol)  # type: ignore[arg-type]
        except ValueError:  # RDP cannot meet the target below max_noise; PRV can (checked)
            start = float(max_noise)
        shrink = 0.85

    # Bracket: lo infeasible (ε > target, or σ = 0), hi feasible.
    hi = start
    if eps(hi) <= target:
        lo = hi * shrink
        while lo > 1e-6 and eps(lo) <= target:
            hi, lo = lo, lo * shrink
        if lo <= 1e-6:
            lo = 0.0
    else:
        lo = hi
        hi = min(2 * lo, float(max_noise))
        while eps(hi) > target:  # terminates: eps(max_noise) <= target (checked)
            lo, hi = hi, min(2 * hi, float(max_noise))
    eps_hi = eps(hi)
    while target - eps_hi > tol:
        mid = (lo + hi) / 2
        if not lo < mid < hi:  # float resolution reached
            break
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    if not eps_hi <= target:  # pragma: no cover - invariant of the bisection
        raise RuntimeError(f"calibrate_noise: epsilon {eps_hi} above target {target}")
    return hi
