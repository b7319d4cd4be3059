"""DPQuant: which layers run in low precision each epoch of DP-SGD (PAPERS.md, section A).

Gao, Tu, Pekhimenko, Vijaykumar, "DPQuant: Efficient and Differentially-Private Model
Training via Dynamic Quantization Scheduling", arXiv 2509.03472 (ICLR 2026).

Each epoch only k = round(ratio · n) of the n quantizable layers are quantized:

* probabilistic layer sampling (PLS): a fresh subset every epoch, drawn without
  replacement, so the quantized set rotates;
* loss-aware layer prioritisation (LLP): draw probabilities π = softmax(-β L), where L_i
  estimates the loss increase when only layer i is quantized;
* L is the EMA (weight α) of a DP estimate R̂ (:func:`estimate_sensitivity`), refreshed
  every P epochs. R̂ is a Sampled Gaussian Mechanism on the client's data and must be
  charged to the client's :class:`~fedquant.accounting.PrivacyLedger`; the EMA and the
  sampling are post-processing and cost nothing.

Speedups are theoretical, as in the paper (:func:`theoretical_speedup`).

The constants the paper leaves open (β, α, C_a, σ_a, q_a, P) are settings of a run:
:class:`fedquant.config.DPQuantSettings` holds them, their defaults and the reasons for
those defaults; :meth:`LayerScheduler.from_settings` and ``fedquant.training`` take them
from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch

# isort: off
import fedquant._opacus  # noqa: F401  (before Opacus: drops its root log handler)

# isort: on
from opacus.optimizers.optimizer import _generate_noise
from torch import nn

from fedquant.checks import is_finite, is_int, is_real
from fedquant.config import DPQuantSettings, QuantPolicy

__all__ = [
    "LayerScheduler",
    "QuantPolicy",
    "estimate_sensitivity",
    "estimator_flops",
    "layer_flops",
    "num_quantized",
    "sample_layers",
    "selection_probabilities",
    "theoretical_speedup",
]

# Spawn keys separating the scheduler's random streams derived from one seed.
_STATIC_STREAM = 0
_EPOCH_STREAM = 1


def num_quantized(n_layers: int, ratio: float) -> int:
    """The number of layers quantized: k = round(ratio · n), halves rounded up.

    Halves go up, not to even as in Python's ``round``: 0.5 · 5 → 3 (``round`` gives 2).
    A 1e-9 slack absorbs float error in ratio · n (0.7 · 5 = 3.4999999999999996 → 4).
    """
    if not is_int(n_layers) or n_layers < 0:
        raise ValueError(f"`n_layers` must be an integer >= 0. Found `{n_layers!r}`.")
    if not is_finite(ratio) or not 0 <= ratio <= 1:
        raise ValueError(f"`ratio` must be in [0, 1]. Found `{ratio!r}`.")
    return min(int(n_layers), math.floor(float(ratio) * n_layers + 0.5 + 1e-9))


def _vector(x: object, name: str, n: int | None = None) -> np.ndarray:
    try:
        v = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"`{name}` must be a 1-D array of real numbers. Found `{x!r}`.") from e
    if v.ndim != 1 or (n is not None and v.shape[0] != n):
        want = "1-D" if n is None else f"shape ({n},)"
        raise ValueError(f"`{name}` must have {want}. Found shape `{v.shape}`.")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` must be finite. Found `{v}`.")
    return v


def selection_probabilities(sensitivity: np.ndarray, *, beta: float) -> np.ndarray:
    """π_i = exp(-β L_i) / Σ_j exp(-β L_j) (paper A, LLP), float64, shape (n,).

    Computed as softmax of z = -β L - max(-β L), so the largest term is exp(0) = 1 and
    nothing overflows; terms with β·(L_i - min L) > ~745 underflow to exactly 0.
    """
    L = _vector(sensitivity, "sensitivity")
    if L.shape[0] == 0:
        raise ValueError("`sensitivity` must have at least one layer.")
    if not is_finite(beta) or beta < 0:
        raise ValueError(f"`beta` must be finite and >= 0. Found `{beta!r}`.")
    z = -float(beta) * L
    z -= z.max()
    e: np.ndarray = np.exp(z)
    probabilities: np.ndarray = e / e.sum()
    return probabilities


def sample_layers(probabilities: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Draw k distinct layer indices by successive sampling without replacement, sorted.

    Successive sampling: the first index is drawn from π, each next one from π restricted
    to the indices not yet drawn and renormalised (numpy's
    ``rng.choice(n, k, replace=False, p=π)`` draws exactly this). The inclusion
    probability of i is not k·π_i in general (it is for k = 1).
    Caveat: if fewer than k entries of π are > 0 (underflow in softmax), all those are
    taken and the rest are drawn uniformly from the zero-probability indices, the limit
    of successive sampling as their probabilities tend to equal tiny values.
    """
    p = _vector(probabilities, "probabilities")
    n = p.shape[0]
    if not is_int(k) or not 0 <= k <= n:
        raise ValueError(f"`k` must be an integer in [0, {n}]. Found `{k!r}`.")
    if np.any(p < 0) or not math.isclose(p.sum(), 1.0, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"`probabilities` must be >= 0 and sum to 1. Found `{p}`.")
    if k == 0:
        return []
    p = p / p.sum()
    positive = np.flatnonzero(p > 0)
    if positive.size >= k:
        chosen = rng.choice(n, size=int(k), replace=False, p=p)
    else:
        zero = np.flatnonzero(p == 0)
        fill = rng.choice(zero, size=int(k) - positive.size, replace=False)
        chosen = np.concatenate([positive, fill])
    return sorted(int(i) for i in chosen)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_EPOCH_STREAM, epoch)))


def _static_subset(n_layers: int, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STATIC_STREAM,)))
    return sorted(int(i) for i in rng.choice(n_layers, size=k, replace=False))


_DEFAULTS = DPQuantSettings()

_FIELDS = (
    "n_layers",
    "policy",
    "ratio",
    "beta",
    "alpha",
    "seed",
    "sensitivity",
    "static_subset",
    "epochs_done",
)


def _policy(value: object) -> QuantPolicy:
    """``value`` as a QuantPolicy (the enum itself or its string value); ValueError else."""
    if isinstance(value, QuantPolicy):
        return value
    try:
        return QuantPolicy(value)
    except ValueError as e:
        raise ValueError(
            f"`policy` must be one of {[p.value for p in QuantPolicy]}. Found `{value!r}`."
        ) from e


@dataclass(eq=False)
class LayerScheduler:
    """Per-client DPQuant schedule; state persisted across rounds by the caller.

    Persist with :meth:`to_dict` / :meth:`from_dict` (plain lists and numbers, for a
    Flower ConfigRecord). Reproducible across restarts: epoch e's subset depends only on
    (seed, e) and, for DPQUANT, on the sensitivity EMA at that time.

    Fields: ``n_layers`` quantizable layers; ``ratio`` → k = :func:`num_quantized`;
    ``beta`` of π = softmax(-β L); ``alpha`` in (0, 1], the EMA weight of
    :meth:`update_sensitivity`; ``seed`` >= 0; ``sensitivity`` L, shape (n,), starts at
    zeros (uniform π); ``static_subset`` the fixed subset of STATIC (drawn from the seed
    when not given; ``[]`` for other policies); ``epochs_done`` epochs scheduled so far.
    A run builds it with :meth:`from_settings`; policy, ratio, β and α are also part of
    the persisted state, so a restored schedule goes on with the constants it began with.
    The defaults of β and α are :class:`~fedquant.config.DPQuantSettings`'.
    """

    n_layers: int
    policy: QuantPolicy
    ratio: float
    beta: float = _DEFAULTS.beta
    alpha: float = _DEFAULTS.alpha
    seed: int = 0
    sensitivity: np.ndarray | None = None
    static_subset: list[int] | None = None
    epochs_done: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.n_layers) or self.n_layers < 1:
            raise ValueError(f"`n_layers` must be an integer >= 1. Found `{self.n_layers!r}`.")
        self.n_layers = int(self.n_layers)
        self.policy = _policy(self.policy)
        k = num_quantized(self.n_layers, self.ratio)
        self.ratio = float(self.ratio)
        if not is_finite(self.beta) or self.beta < 0:
            raise ValueError(f"`beta` must be finite and >= 0. Found `{self.beta!r}`.")
        self.beta = float(self.beta)
        if not is_finite(self.alpha) or not 0 < self.alpha <= 1:
            raise ValueError(f"`alpha` must be in (0, 1]. Found `{self.alpha!r}`.")
        self.alpha = float(self.alpha)
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be an integer in [0, 2**63). Found `{self.seed!r}`.")
        self.seed = int(self.seed)
        if not is_int(self.epochs_done) or not 0 <= self.epochs_done < 2**63:
            raise ValueError(
                f"`epochs_done` must be an integer >= 0. Found `{self.epochs_done!r}`."
            )
        self.epochs_done = int(self.epochs_done)
        if self.sensitivity is None:
            self.sensitivity = np.zeros(self.n_layers)
        else:
            self.sensitivity = _vector(self.sensitivity, "sensitivity", self.n_layers).copy()
        if self.static_subset is None:
            self.static_subset = (
                _static_subset(self.n_layers, k, self.seed)
                if self.policy is QuantPolicy.STATIC
                else []
            )
        else:
            subset = self.static_subset
            want = k if self.policy is QuantPolicy.STATIC else 0
            if (
                not isinstance(subset, list | tuple)
                or len(subset) != want
                or not all(is_int(i) and 0 <= i < self.n_layers for i in subset)
                or len(set(subset)) != len(subset)
            ):
                raise ValueError(
                    f"`static_subset` must be {want} distinct layer indices in "
                    f"[0, {self.n_layers}) for policy {self.policy.value}. Found `{subset!r}`."
                )
            self.static_subset = sorted(int(i) for i in subset)

    @classmethod
    def from_settings(cls, settings: DPQuantSettings, *, n_layers: int, seed: int) -> Self:
        """A fresh schedule of ``n_layers`` layers with a run's DPQuant settings.

        Policy, ratio, β and α come from ``settings``; the sensitivity EMA starts at zeros.
        ``seed`` drives the layer draws only (public by design: the subsets are not
        computed from the examples), never the estimator's subsample or noise.
        """
        return cls(
            n_layers=n_layers,
            policy=settings.policy,
            ratio=settings.train_ratio,
            beta=settings.beta,
            alpha=settings.alpha,
            seed=seed,
        )

    @property
    def k(self) -> int:
        """Layers quantized per epoch (0 for NONE)."""
        return 0 if self.policy is QuantPolicy.NONE else num_quantized(self.n_layers, self.ratio)

    def probabilities(self) -> np.ndarray:
        """π = softmax(-β L) with the current sensitivity EMA."""
        return selection_probabilities(self._sensitivity, beta=self.beta)

    @property
    def _sensitivity(self) -> np.ndarray:
        assert self.sensitivity is not None  # set in __post_init__
        return self.sensitivity

    def next_epoch(self) -> list[int]:
        """The (sorted) layers quantized this epoch: exactly k of them, [] for NONE.

        Randomness comes from a numpy Generator seeded by (seed, epochs_done) only, so a
        scheduler restored with :meth:`from_dict` continues the same sequence.
        """
        rng = _epoch_rng(self.seed, self.epochs_done)
        k = self.k
        if self.policy is QuantPolicy.NONE:
            chosen: list[int] = []
        elif self.policy is QuantPolicy.STATIC:
            chosen = list(self.static_subset or [])
        elif self.policy is QuantPolicy.RANDOM:
            chosen = sorted(int(i) for i in rng.choice(self.n_layers, size=k, replace=False))
        else:
            chosen = sample_layers(self.probabilities(), k, rng)
        self.epochs_done += 1
        return chosen

    def update_sensitivity(self, estimate: np.ndarray) -> None:
        """L ← (1 - α) L + α R̂ (paper A's EMA).

        Post-processing of the DP estimate R̂: no privacy cost. With L starting at zeros
        the first update gives α R̂ (no bias correction): the same ranking, at a lower
        effective β for the first epochs.
        """
        r = _vector(estimate, "estimate", self.n_layers)
        self.sensitivity = (1 - self.alpha) * self._sensitivity + self.alpha * r

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, strings and lists (a Flower ConfigRecord holds them as is)."""
        return {
            "n_layers": self.n_layers,
            "policy": self.policy.value,
            "ratio": self.ratio,
            "beta": self.beta,
            "alpha": self.alpha,
            "seed": self.seed,
            "sensitivity": [float(v) for v in self._sensitivity],
            "static_subset": list(self.static_subset or []),
            "epochs_done": self.epochs_done,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; strict (exact keys, types, ranges) → ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a layer scheduler must be a mapping. Found `{type(d).__name__}`.")
        if set(d.keys()) != set(_FIELDS):
            raise ValueError(
                f"a layer scheduler needs exactly the keys {list(_FIELDS)}. "
                f"Found `{sorted(map(repr, d.keys()))}`."
            )
        if not isinstance(d["policy"], str):
            raise ValueError(f"`policy` must be a string. Found `{d['policy']!r}`.")
        for key in ("sensitivity", "static_subset"):
            if not isinstance(d[key], list | tuple):
                raise ValueError(f"`{key}` must be a list. Found `{d[key]!r}`.")
        if not all(is_real(v) for v in d["sensitivity"]):
            raise ValueError(f"`sensitivity` must hold real numbers. Found `{d['sensitivity']!r}`.")
        for key in ("ratio", "beta", "alpha"):
            if not is_real(d[key]):
                raise ValueError(f"`{key}` must be a real number. Found `{d[key]!r}`.")
        return cls(
            n_layers=d["n_layers"],
            policy=_policy(d["policy"]),
            ratio=d["ratio"],
            beta=d["beta"],
            alpha=d["alpha"],
            seed=d["seed"],
            sensitivity=np.asarray(d["sensitivity"], dtype=np.float64),
            static_subset=list(d["static_subset"]),
            epochs_done=d["epochs_done"],
        )


def estimate_sensitivity(
    per_example_losses: Callable[[int | None, torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_layers: int,
    sample_rate: float,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> np.ndarray:
    """Paper A's DP loss-sensitivity estimator R̂, float64, shape (n_layers,).

    ``per_example_losses(i, x, y)`` returns the (B,) losses of the model with only layer
    i quantized (``None``: full precision); ``images``/``labels`` are the client's whole
    local dataset D. Then:

    * B: Poisson subsample of D, each example kept independently with rate q_a
      (``sample_rate``), drawn from ``generator`` (secret: the client's OS-entropy
      generator, like DP-SGD's; a seed the server knows voids the guarantee);
    * r(x)_i = loss_i(x) − loss_fp(x) for x in B (n + 1 batched forward passes);
    * r(x) ← r(x) · min(1, C_a / ‖r(x)‖₂) (``clip`` = C_a);
    * R̂ = (Σ_{x∈B} r(x) + N(0, σ_a² C_a² I_n)) / (q_a · |D|) (``noise_multiplier`` = σ_a).

    Privacy: this is one application of the Sampled Gaussian Mechanism with rate q_a,
    noise multiplier σ_a and L2 sensitivity C_a under add/remove-one adjacency (|D| in
    the denominator is treated as public, as Opacus does with the expected batch size).
    The caller MUST charge ``MechanismStep(σ_a, q_a, 1)`` per call to the same
    :class:`~fedquant.accounting.PrivacyLedger` as training. An empty subsample still
    adds the noise (it must, for the guarantee). A vector r(x) with a non-finite entry
    contributes zero (raising would reveal a property of the sample). ``noise_multiplier``
    = 0 is allowed for non-private training only; it gives no guarantee.

    Runs under ``torch.no_grad()``; put the model in eval mode in ``per_example_losses``
    if it has batch-dependent layers.
    """
    if not is_int(n_layers) or n_layers < 1:
        raise ValueError(f"`n_layers` must be an integer >= 1. Found `{n_layers!r}`.")
    if not is_finite(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"`sample_rate` must be in (0, 1]. Found `{sample_rate!r}`.")
    if not is_finite(clip) or clip <= 0:
        raise ValueError(f"`clip` must be finite and > 0. Found `{clip!r}`.")
    if not is_finite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(
            f"`noise_multiplier` must be finite and >= 0. Found `{noise_multiplier!r}`."
        )
    size = images.shape[0]
    if size < 1 or labels.shape[0] != size:
        raise ValueError(
            f"`images` and `labels` must hold the same number (>= 1) of examples. "
            f"Found `{size}` and `{labels.shape[0]}`."
        )
    device = generator.device
    keep = torch.rand(size, generator=generator, device=device) < sample_rate  # (|D|,)
    index = keep.nonzero().flatten().to(images.device)
    total = torch.zeros(n_layers, dtype=torch.float64)
    if index.numel() > 0:
        x, y = images[index], labels[index]
        batch = index.numel()
        with torch.no_grad():
            base = _losses(per_example_losses, None, x, y, batch)  # (B,)
            r = torch.stack(
                [_losses(per_example_losses, i, x, y, batch) - base for i in range(n_layers)],
                dim=1,
            )  # (B, n)
        r = torch.where(torch.isfinite(r).all(dim=1, keepdim=True), r, torch.zeros_like(r))
        norm = torch.linalg.vector_norm(r, dim=1, keepdim=True)  # (B, 1)
        scale = torch.where(norm > clip, clip / norm.clamp_min(torch.finfo(r.dtype).tiny), 1.0)
        total = (r * scale).sum(dim=0)  # (n,)
    # Opacus' secure-mode sampler (robust to floating-point attacks; see
    # fedquant.training.private_engine), as for the training noise.
    noise = _generate_noise(
        std=float(noise_multiplier) * float(clip),
        reference=torch.zeros(n_layers, dtype=torch.float64, device=device),
        generator=generator,
        secure_mode=True,
    )
    total = total + noise.cpu().to(torch.float64)
    estimate: np.ndarray = (total / (float(sample_rate) * size)).numpy()
    return estimate


def _losses(
    fn: Callable[[int | None, torch.Tensor, torch.Tensor], torch.Tensor],
    layer: int | None,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    out = fn(layer, x, y)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"per_example_losses({layer}, x, y) must return a tensor of shape ({batch},). "
            f"Found `{shape}`."
        )
    return out.detach().to(device="cpu", dtype=torch.float64)


def layer_flops(
    model: nn.Module, layers: Sequence[nn.Module], example_input: torch.Tensor
) -> list[float]:
    """Forward MACs per example of each layer in ``layers``, from one forward pass.

    nn.Linear: in · out per output row (bias ignored), times the rows per example
    (1 for a (B, in) input); nn.Conv1d/2d/3d: C_out · (C_in / groups) · ∏kernel · ∏output
    spatial size. Measured with forward hooks on ``model(example_input)`` under
    ``torch.no_grad()`` in eval mode (module modes are restored afterwards), divided by
    the batch size of ``example_input`` (normally 1). A layer called several times is
    counted each time; a layer not called raises ``ValueError``. Subclasses (e.g.
    fake-quantized layers) count as their base type.
    """
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            raise ValueError(
                f"layer {i} ({type(layer).__name__}) is not nn.Linear or nn.Conv1d/2d/3d."
            )
    if example_input.ndim < 1 or example_input.shape[0] < 1:
        raise ValueError(f"`example_input` needs a batch dimension. Found `{example_input.shape}`.")
    batch = example_input.shape[0]
    macs = [0.0] * len(layers)
    calls = [0] * len(layers)

    def hook(i: int) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            calls[i] += 1
            if isinstance(module, nn.Linear):
                rows = output.numel() / module.out_features  # (..., out)
                macs[i] += module.in_features * module.out_features * rows / batch
            else:
                conv: nn.Conv1d | nn.Conv2d | nn.Conv3d = module  # type: ignore[assignment]
                spatial = math.prod(output.shape[2:])  # (B, C_out, *spatial)
                macs[i] += (
                    conv.out_channels
                    * (conv.in_channels // conv.groups)
                    * math.prod(conv.kernel_size)
                    * spatial
                    * (output.shape[0] / batch)
                )

        return record

    modes = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for i, n in enumerate(calls):
        if n == 0:
            raise ValueError(f"layer {i} ({type(layers[i]).__name__}) was not called in forward.")
    return [float(m) for m in macs]


def theoretical_speedup(
    flops: Sequence[float],
    quantized: Sequence[int],
    *,
    low_precision_speedup: float = 4.0,
    other_flops: float = 0.0,
    analysis_flops: float = 0.0,
) -> float:
    """Paper A's theoretical speedup T_fp / T of one epoch.

    T = T_analysis + (1 − p + p/s) · (T_train − T_other) + T_other, with
    T_train = Σ flops + other_flops, T_other = other_flops (the non-quantizable part),
    p = Σ_{i ∈ quantized} flops_i / Σ flops (the FLOP-weighted quantized fraction),
    s = ``low_precision_speedup`` (FP4 vs FP16: 4) and T_analysis = ``analysis_flops``;
    T_fp = T_train (nothing quantized, no analysis). Example: p = 0.9, s = 4, no
    analysis → 1 / (0.1 + 0.9/4) = 3.0769.

    Units: any one cost unit for all three arguments. The formula does not scale the
    training terms, so the caller expresses training and analysis alike: e.g. training
    as 3 × forward MACs × examples (forward plus the two backward matmuls) and the
    estimator as its forward MACs (it runs forward passes only; see
    :func:`estimator_flops`). Where the analysis is 0 the factor cancels.
    """
    f = np.asarray(flops, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(
            f"`flops` must be a non-empty list of finite values >= 0. Found `{flops}`."
        )
    if f.sum() <= 0:
        raise ValueError(f"`flops` must not all be zero. Found `{flops}`.")
    q = list(quantized)
    if not all(is_int(i) and 0 <= i < f.size for i in q) or len(set(q)) != len(q):
        raise ValueError(f"`quantized` must be distinct indices in [0, {f.size}). Found `{q}`.")
    if not is_finite(low_precision_speedup) or low_precision_speedup <= 0:
        raise ValueError(
            f"`low_precision_speedup` must be finite and > 0. Found `{low_precision_speedup!r}`."
        )
    for name, value in (("other_flops", other_flops), ("analysis_flops", analysis_flops)):
        if not is_finite(value) or value < 0:
            raise ValueError(f"`{name}` must be finite and >= 0. Found `{value!r}`.")
    quantizable = float(f.sum())
    p = float(f[q].sum()) / quantizable if q else 0.0
    s = float(low_precision_speedup)
    t_train = quantizable + float(other_flops)
    t = float(analysis_flops) + (1 - p + p / s) * quantizable + float(other_flops)
    return t_train / t


def estimator_flops(
    flops: Sequence[float], *, n_examples: int, sample_rate: float, other_flops: float = 0.0
) -> float:
    """Expected forward MACs of one :func:`estimate_sensitivity` call.

    (n + 1) full-model forward passes (all at full precision, conservatively) over the
    expected q_a · |D| subsampled examples: (n + 1) · (Σ flops + other) · q_a · |D|.
    """
    if not is_int(n_examples) or n_examples < 0:
        raise ValueError(f"`n_examples` must be an integer >= 0. Found `{n_examples!r}`.")
    if not is_finite(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"`sample_rate` must be in (0, 1]. Found `{sample_rate!r}`.")
    per_pass = float(np.sum(np.asarray(flops, dtype=np.float64))) + float(other_flops)
    return (len(flops) + 1) * per_pass * float(sample_rate) * n_examples
