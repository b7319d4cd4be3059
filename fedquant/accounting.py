"""Cumulative Rényi-DP accounting of a client's Sampled Gaussian Mechanism applications.

Every DP-SGD step, and every DPQuant sensitivity estimate (PAPERS.md, section A), is one
application of the Sampled Gaussian Mechanism (SGM): Poisson subsampling with rate q,
a sum of contributions clipped to L2 norm C, plus N(0, σ²C²I). A client's privacy
history is the list of (σ, q, steps) entries it has run. The history persists across
FL rounds (the caller stores :meth:`PrivacyLedger.to_dict` in its node state), so the ε
reported is cumulative over the whole run, never per round.

The analysis is Opacus' RDP accountant, used as is:

* RDP of the SGM at each order α (Mironov, "Rényi Differential Privacy", CSF 2017;
  Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
  Mechanism", arXiv 1908.10530, 2019): ``opacus.accountants.analysis.rdp.compute_rdp``.
* Composition: RDP adds up over entries (Mironov 2017, Proposition 1).
* Conversion to (ε, δ)-DP: ``opacus.accountants.analysis.rdp.get_privacy_spent``
  (Balle et al., "Hypothesis testing interpretations and Rényi differential privacy",
  AISTATS 2020, Theorem 21), minimised over ``RDPAccountant.DEFAULT_ALPHAS``.

So a ledger reports exactly the ε of an ``opacus.accountants.RDPAccountant`` that ran the
same steps. Caveat: this is the RDP bound (looser than Opacus' PRV accountant, Opacus'
default since 1.5); it is the one with a closed form per entry, which is what lets the
history be stored as three plain lists. Opacus warns when the optimal order is the
smallest or largest α in its grid (the bound is then looser than it could be); the warning
is passed through by :meth:`PrivacyLedger.epsilon`.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

__all__ = ["MechanismStep", "PrivacyLedger", "calibrate_noise"]

ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
"""RDP orders α at which ε is optimised: Opacus' RDPAccountant.DEFAULT_ALPHAS."""

_KEYS = ("noise", "rate", "steps")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _finite(value: object) -> bool:
    """A real number (not bool) that converts to a finite float."""
    if not _is_real(value):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


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
        if not _finite(sigma) or sigma <= 0:
            raise ValueError(f"`noise_multiplier` must be finite and > 0. Found `{sigma!r}`.")
        if not _finite(q) or not 0 < q <= 1:
            raise ValueError(f"`sample_rate` must be in (0, 1]. Found `{q!r}`.")
        if not _is_int(steps) or steps < 1:
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


def _epsilon(history: Iterable[MechanismStep], delta: float) -> float:
    """ε of the composition of ``history`` at ``delta`` (0.0 when empty).

    Entries with the same (σ, q) are grouped first (RDP composes additively, so
    Σ_entries steps·rdp(σ, q) is unchanged); the per-step RDP is cached per (σ, q).
    """
    if not _is_real(delta) or not 0 < delta < 1:
        raise ValueError(f"`delta` must be in (0, 1). Found `{delta!r}`.")
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for entry in history:
        key = (entry.noise_multiplier, entry.sample_rate)
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + entry.steps
    if not steps_by_mechanism:
        return 0.0
    rdp = np.zeros(len(ORDERS))
    for (sigma, q), steps in steps_by_mechanism.items():
        rdp = rdp + _rdp_per_step(sigma, q) * steps
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=float(delta))
    return float(eps)


class PrivacyLedger:
    """History of SGM applications for one client; RDP accountant.

    Mironov 2017; Mironov, Talwar, Zhang 2019 (see the module docstring). Consecutive
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

    def epsilon(self, *, delta: float) -> float:
        """Cumulative ε at ``delta`` of everything recorded (0.0 for an empty history)."""
        return _epsilon(self._history, delta)

    def epsilon_if(self, *extra: MechanismStep, delta: float) -> float:
        """ε after hypothetically adding ``extra`` (a budget check before training)."""
        for entry in extra:
            if not isinstance(entry, MechanismStep):
                raise ValueError(f"extra entries must be MechanismStep. Found `{entry!r}`.")
        return _epsilon([*self._history, *extra], delta)

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """``{"noise": [σ...], "rate": [q...], "steps": [n...]}``: lists for a ConfigRecord."""
        return {
            "noise": [e.noise_multiplier for e in self._history],
            "rate": [e.sample_rate for e in self._history],
            "steps": [e.steps for e in self._history],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence]) -> PrivacyLedger:
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


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    extra: Sequence[MechanismStep] = (),
    max_noise: float = 1e3,
    tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier σ (to ``tol`` in ε) with ε([(σ, q, steps), *extra]) <= target.

    ``extra`` are fixed queries charged to the same budget (e.g. the DPQuant estimator's
    ``MechanismStep(σ_a, q_a, calls)``). ε is decreasing in σ, so σ is bracketed by
    doubling/halving from 1 and then bisected. The result satisfies
    ``target - tol <= ε(σ) <= target``, or, where ε jumps faster than float resolution of σ
    allows, the smallest representable feasible σ found; it is never above the target
    (checked before returning).

    Raises ``ValueError`` when the target is impossible: when ``extra`` alone already
    spends it, or when even ``max_noise`` does not meet it.
    """
    if not _finite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"`target_epsilon` must be finite and > 0. Found `{target_epsilon!r}`.")
    if not _finite(max_noise) or max_noise <= 0:
        raise ValueError(f"`max_noise` must be finite and > 0. Found `{max_noise!r}`.")
    if not _finite(tol) or tol <= 0:
        raise ValueError(f"`tol` must be finite and > 0. Found `{tol!r}`.")
    MechanismStep(1.0, sample_rate, steps)  # validates q and steps
    for entry in extra:
        if not isinstance(entry, MechanismStep):
            raise ValueError(f"extra entries must be MechanismStep. Found `{entry!r}`.")
    target = float(target_epsilon)

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():  # extreme-order warnings while searching
            warnings.simplefilter("ignore")
            return _epsilon([MechanismStep(sigma, sample_rate, steps), *extra], delta)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spent = _epsilon(extra, delta)
    if spent >= target:
        raise ValueError(
            f"target epsilon {target} cannot be met: the estimator queries alone spend {spent:.6g}"
        )
    eps_max = eps(max_noise)
    if eps_max > target:
        raise ValueError(
            f"target epsilon {target} cannot be met: even at noise multiplier {max_noise} "
            f"epsilon is {eps_max:.6g}"
        )

    # Bracket: lo infeasible (ε > target, or σ = 0), hi feasible.
    hi = min(1.0, float(max_noise))
    if eps(hi) <= target:
        lo = hi / 2
        while lo > 1e-6 and eps(lo) <= target:
            hi, lo = lo, lo / 2
        if lo <= 1e-6:
            lo = 0.0
    else:
        lo = hi
        hi = min(2 * lo, float(max_noise))
        while eps(hi) > target:  # terminates: eps(max_noise) <= target
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
