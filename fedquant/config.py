"""The run configuration: Flower's flat run-config keys, validated once, in sections.

Flower hands both apps a flat mapping of kebab-case keys (``context.run_config``, from
``[tool.flwr.app.config]`` in pyproject.toml plus ``--run-config`` overrides).
:meth:`RunConfig.from_flower` sorts it into frozen sections, one per concern:

========== ==================================================================
``run``    rounds, nodes, sampling, seed, outputs, checkpoints, timeouts
``train``  model, data partitioning, local (DP-)SGD steps and step sizes
``codec``  the upload codec: bits, clip rule, rounding, what is uploaded
``dp``     sample-level DP-SGD: (ε, δ), clipping, accountant, noise secrecy
``dpquant`` which layers train in low precision (DPQuant, paper A)
``robust`` aggregation rule and the bounds on hostile replies
``ptq``    post-training quantization of the final model (MRECG, paper C)
========== ==================================================================

Each field names its run-config key; the field defaults here are the only defaults
(pyproject.toml and the README's table are checked against them by a test). Every value
is checked in ``__post_init__``; a bad one raises :class:`ConfigError` naming the key and
the value, before any client starts. The modes are enums defined here, with their
arithmetic in the docstring; this module imports no implementation.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

UNQUANTIZED_BITS = 32
"""``bits`` of an unquantized (float32) upload."""

MAX_CODE_BITS = 8
"""The codec's widest code: 1..8 bits per coordinate."""


class ConfigError(ValueError):
    """A run-config key has an invalid value (or is unknown)."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"run config key '{key}' = {value!r}: {reason}")
        self.key = key
        self.value = value


def check_bits(bits: object, *, key: str = "bits") -> int:
    """``bits`` as an int in 1..8, or 32 (unquantized); ConfigError otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(key, bits, "must be an integer")
    if not (1 <= bits <= MAX_CODE_BITS or bits == UNQUANTIZED_BITS):
        raise ConfigError(key, bits, f"must be 1..{MAX_CODE_BITS}, or 32 for unquantized")
    return bits


# Modes --------------------------------------------------------------------------------


class ModelName(enum.Enum):
    """The model trained: a small CNN (4 quantizable layers) or a GroupNorm ResNet (10)."""

    CNN = "cnn"
    RESNET = "resnet"


class Partitioning(enum.Enum):
    """How the training split is divided among clients.

    IID: a seeded shuffle cut into equal parts.
    DIRICHLET: per class, client shares drawn from Dirichlet(alpha · 1); small alpha
    gives each client few classes (Hsu et al. 2019, "Measuring the effects of
    non-identical data distribution").
    """

    IID = "iid"
    DIRICHLET = "dirichlet"


class Rounding(enum.Enum):
    """How n*y in [0, n] is rounded to an integer code c in 0..n.

    STOCHASTIC: ``c = floor(n*y + u)`` with ``u ~ U[0, 1)``; unbiased, E[c] = n*y
        (Bozorgasl & Chen 2024, Sec. II). The expected squared error of one element with
        fractional part f is ``f (1 - f) Delta**2`` (<= Delta**2 / 4), Delta = 2 s / n.
    NEAREST: ``c = round(n*y)``, computed as ``floor(n*y + 1/2)`` (ties go up);
        deterministic, error at most Delta / 2.
    DITHERED: subtractive dither (Roberts 1962; Schuchman 1964): the codes of STOCHASTIC,
        ``c = floor(n*y + u)``, with ``u`` drawn from a seed sent with the reply, and the
        decoder subtracts it: ``x_hat = level(c) - (u - 1/2) Delta``. Inside the clip range
        the error is uniform on ``[-Delta/2, Delta/2)`` and independent of the input
        (variance ``Delta**2 / 12``, half that of STOCHASTIC for uniform fractions).
    """

    STOCHASTIC = "stochastic"
    NEAREST = "nearest"
    DITHERED = "dithered"


class Rotation(enum.Enum):
    """A transform applied to each flattened tensor before quantization.

    NONE: the tensor is quantized as it is.
    HADAMARD: a randomized Hadamard transform ``y = H D x / sqrt(b)`` per block of b
        coordinates (D random signs from the seed sent with the reply; Suresh et al. ICML
        2017, Vargaftik et al. DRIVE 2021 / EDEN 2022): orthogonal, so the server inverts
        it exactly, and it spreads heavy-tailed coordinates into near-Gaussian ones, which
        a clipped uniform grid quantizes far better.
    """

    NONE = "none"
    HADAMARD = "hadamard"


class ClipRule(enum.Enum):
    """How the clip threshold s is chosen from the tensor.

    MAX: ``s = max|x|`` (no clipping; the "conventional" baseline).
    OCTAV: the s minimizing the mean squared error of this quantizer
        (``fedquant.codec.octav_clip``).
    """

    MAX = "max"
    OCTAV = "octav"


class PayloadMode(enum.Enum):
    """What a client uploads.

    UPDATE: Δ = w_local − w_global, quantized (the default; Δ is small and centred,
    so the clip threshold is tight).
    WEIGHTS: w_local itself, quantized: the setting of Bozorgasl & Chen (2024), who
    send quantized weights and their quantization error.
    """

    UPDATE = "update"
    WEIGHTS = "weights"


class Accountant(enum.Enum):
    """How a history of SGM applications becomes one (ε, δ) (``fedquant.accounting``).

    RDP: ε = min_α [Σ_entries steps·RDP_α(σ, q)] converted by Balle et al. 2020, Thm 21.
    PRV: ε_up of the numerically composed privacy loss distribution (Gopi et al. 2021).
    """

    RDP = "rdp"
    PRV = "prv"


class QuantPolicy(enum.Enum):
    """Which k = round(ratio · n) layers are quantized in an epoch.

    NONE: no layer (k is ignored).
    STATIC: one uniform random k-subset, drawn once from the seed, for the whole run
      (the paper's "static" baseline).
    RANDOM: a fresh uniform k-subset each epoch (PLS without priorities).
    DPQUANT: a fresh k-subset each epoch by successive sampling without replacement from
      π = softmax(-β L) (PLS + LLP).
    """

    NONE = "none"
    STATIC = "static"
    RANDOM = "random"
    DPQUANT = "dpquant"


class QuantFormat(enum.Enum):
    """Low-precision number formats, each relative to a scale α > 0 (the largest magnitude).

    INT8: symmetric uniform, Δ = α/127, q(x) = Δ · clamp(round(x/Δ), -127, 127).
    INT4: symmetric uniform, Δ = α/7,   q(x) = Δ · clamp(round(x/Δ), -7, 7).
        ``round`` is round-half-to-even; for |x| ≤ α the error is at most Δ/2, larger
        magnitudes saturate at ±α.
    FP4: radix-2 4-bit float as in LUQ (Chmiel et al., ICLR 2023, "Accurate Neural Training
        with 4-bit Matrix Multiplications at Standard Formats", Sec. 3/4): 1 sign bit and
        3 exponent bits, no mantissa, so the magnitudes are {0} ∪ {α · 2^-j, j = 0..6}
        (eight codes per sign; code 0 is zero). Rounding is in the log domain:
        |q(x)| = α · 2^clamp(round(log2(|x|/α)), -6, 0), i.e. to the power of two nearest
        in log2 (the boundary between α2^-j-1 and α2^-j is their geometric mean).
        Underflow: |x| < α · 2^-7 (half the smallest nonzero level, the linear-domain
        midpoint between 0 and α2^-6) flushes to 0. LUQ's backward pass uses stochastic
        underflow and stochastic rounding on *gradients*; here FP4 is applied
        deterministically to weights and activations in the forward pass (DPQuant's
        fake quantization), gradients stay in float.
    """

    INT8 = "int8"
    INT4 = "int4"
    FP4 = "fp4"


class ActScale(enum.Enum):
    """How a Q-layer chooses the scale α of its input activation (batch dimension first).

    PER_SAMPLE: α_b = max |x_b| over sample b's own features (all non-batch dimensions).
        Samples do not interact, so per-sample gradients stay exact (a per-batch max would
        couple them).
    FIXED: α = the layer's ``act_clip`` attribute, a constant (default
        ``fedquant.fakequant.DEFAULT_ACT_CLIP`` = 8.0, chosen for inputs normalized to unit
        scale, e.g. normalized MNIST pixels lie in [-0.43, 2.8]); larger magnitudes
        saturate at ±α.
    """

    PER_SAMPLE = "per-sample"
    FIXED = "fixed"


class PTQMethod(enum.Enum):
    """Post-training quantization of the final global model (PAPERS.md, section C).

    NONE: no PTQ.
    RTN: round-to-nearest with MSE-chosen scales; needs no data.
    ADAROUND: learned rounding, layer by layer (Nagel et al., ICML 2020).
    BRECQ: learned rounding and activation steps, block by block (Li et al., ICLR 2021).
    MRECG: BRECQ with adjacent units merged where capacity drops most (Ma et al.,
        CVPR 2023, arXiv 2303.11906).
    """

    NONE = "none"
    RTN = "rtn"
    ADAROUND = "adaround"
    BRECQ = "brecq"
    MRECG = "mrecg"


class Calibration(enum.Enum):
    """Where PTQ's calibration images come from.

    VALIDATION: the first ``ptq-calibration-size`` images of the embedded MNIST's
        validation split, which training never uses (the server holds a small public
        set).
    NONE: no data at all (the usual FL server): only methods that need none.
    """

    VALIDATION = "validation"
    NONE = "none"


class Capacity(enum.Enum):
    """How MRECG measures a reconstruction unit's capacity (``fedquant.ptq``).

    DATA_FREE: from the unit's parameter counts, bit widths and strides.
    DATA_DEPENDENT: from the unit's reconstruction loss on the calibration set.
    """

    DATA_FREE = "data-free"
    DATA_DEPENDENT = "data-dependent"


# Sections -----------------------------------------------------------------------------


def _setting(key: str, default: Any) -> Any:
    """A section field read from run-config key ``key``."""
    return field(default=default, metadata={"key": key})


def _key_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata["key"])


def _positive_int(section: object, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(
                _key_of(_field(section, name)), getattr(section, name), "must be >= 1"
            )


def _positive(section: object, *names: str) -> None:
    for name in names:
        if not getattr(section, name) > 0.0:
            raise ConfigError(_key_of(_field(section, name)), getattr(section, name), "must be > 0")


def _in_unit(section: object, name: str, *, closed_below: bool) -> None:
    value = getattr(section, name)
    if not ((0.0 <= value if closed_below else 0.0 < value) and value <= 1.0):
        interval = "[0, 1]" if closed_below else "(0, 1]"
        raise ConfigError(_key_of(_field(section, name)), value, f"must be in {interval}")


def _off_or_at_least_one(section: object, name: str, what: str) -> None:
    value = getattr(section, name)
    if not (value == 0.0 or 1.0 <= value < math.inf):
        raise ConfigError(
            _key_of(_field(section, name)), value, f"must be 0 ({what}) or finite and >= 1"
        )


def _field(section: object, name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(section) if f.name == name)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RunSettings:
    """Rounds, nodes, sampling, seed, outputs and checkpoints.

    Flower's FedAvg samples max(int(N · fraction_train), min_train_nodes) clients a round.
    ``eval_every``: central evaluation every k rounds and after the last. ``resume``
    continues from the last complete round's checkpoint in ``out_dir``. Client
    privacy/DPQuant state goes to ``client_state_dir/partition-<id>`` when set (a deployed
    SuperNode's node config ``state-dir`` takes precedence).
    """

    num_server_rounds: int = _setting("num-server-rounds", 5)
    num_supernodes: int = _setting("num-supernodes", 10)
    fraction_train: float = _setting("fraction-train", 1.0)
    min_train_nodes: int = _setting("min-train-nodes", 1)
    seed: int = _setting("seed", 0)
    out_dir: str = _setting("out-dir", "outputs")
    round_timeout: float = _setting("round-timeout", 600.0)
    eval_every: int = _setting("eval-every", 1)
    resume: bool = _setting("resume", False)
    client_state_dir: str = _setting("client-state-dir", "")

    def __post_init__(self) -> None:
        _positive_int(self, "num_server_rounds", "num_supernodes", "min_train_nodes", "eval_every")
        _positive(self, "round_timeout")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("fraction-train", self.fraction_train, "must be in (0, 1]")
        if not self.out_dir:
            raise ConfigError("out-dir", self.out_dir, "must not be empty")
        if self.min_train_nodes > self.num_supernodes:
            raise ConfigError("min-train-nodes", self.min_train_nodes, "must be <= num-supernodes")

    @property
    def sampled_per_round(self) -> int:
        """Clients Flower's FedAvg samples each round: max(int(N · fraction), min)."""
        return max(int(self.num_supernodes * self.fraction_train), self.min_train_nodes)


@dataclass(frozen=True)
class TrainSettings:
    """The model, its data partitioning and the local (DP-)SGD.

    ``local_steps`` caps local steps per round (0: ``local_epochs`` full epochs). Under
    DP-SGD the step is ``dp_lr``: a mean of per-example gradients clipped to norm C plus
    noise is a much smaller, noisier signal than a raw gradient, and DP-SGD wants large
    batches and large steps (De et al. 2022, arXiv 2204.13650); ``lr`` is the step of
    non-private training, where 1.0 would diverge.
    """

    model: ModelName = _setting("model", ModelName.CNN)
    partitioning: Partitioning = _setting("partitioning", Partitioning.IID)
    dirichlet_alpha: float = _setting("dirichlet-alpha", 0.5)
    local_epochs: int = _setting("local-epochs", 1)
    local_steps: int = _setting("local-steps", 20)
    batch_size: int = _setting("batch-size", 256)
    lr: float = _setting("lr", 0.05)
    dp_lr: float = _setting("dp-lr", 1.0)
    momentum: float = _setting("momentum", 0.9)

    def __post_init__(self) -> None:
        _positive_int(self, "local_epochs", "batch_size")
        _positive(self, "lr", "dp_lr", "dirichlet_alpha")
        if self.local_steps < 0:
            raise ConfigError("local-steps", self.local_steps, "must be >= 0 (0: full epochs)")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", self.momentum, "must be in [0, 1)")


@dataclass(frozen=True)
class CodecSettings:
    """The upload codec (paper B): B-bit clipped-uniform codes of each tensor.

    ``bits`` 1..8, or 32 to upload float32: with ``entropy_coding`` the bits per
    coordinate actually sent (codes on a finer grid, entropy-coded), otherwise the code
    width. ``rotation`` transforms each tensor first; ``unbiased_scale`` rescales the
    reconstruction by ``|y|**2 / <y, y_hat>`` (DRIVE/EDEN). ``error_feedback`` keeps the
    client's residual ``e = (Δ + e) - Q(Δ + e)`` for the next round (EF, Seide et al.
    2014; Karimireddy et al. 2019). ``downlink_bits`` quantizes what the server
    broadcasts (32: float32). ``mse_floor`` keeps 1/MSE weights finite; ``max_clip``
    bounds the clip threshold a reply may declare.
    """

    bits: int = _setting("bits", 4)
    clip: ClipRule = _setting("clip", ClipRule.OCTAV)
    rounding: Rounding = _setting("rounding", Rounding.STOCHASTIC)
    payload: PayloadMode = _setting("payload", PayloadMode.UPDATE)
    rotation: Rotation = _setting("rotation", Rotation.NONE)
    unbiased_scale: bool = _setting("unbiased-scale", False)
    entropy_coding: bool = _setting("entropy-coding", False)
    error_feedback: bool = _setting("error-feedback", False)
    downlink_bits: int = _setting("downlink-bits", UNQUANTIZED_BITS)
    mse_floor: float = _setting("mse-floor", 1e-12)
    max_clip: float = _setting("max-clip", 1e4)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_bits(self.downlink_bits, key="downlink-bits")
        if not self.quantized:
            for name in ("rotation", "unbiased_scale", "entropy_coding", "error_feedback"):
                value = getattr(self, name)
                if value not in (False, Rotation.NONE):
                    shown = value.value if isinstance(value, enum.Enum) else value
                    key = _key_of(_field(self, name))
                    raise ConfigError(key, shown, "needs quantized uploads (bits 1..8)")
        if self.error_feedback and self.payload is PayloadMode.WEIGHTS:
            raise ConfigError("error-feedback", True, "needs payload = 'update'")
        _positive(self, "mse_floor", "max_clip")

    @property
    def quantized(self) -> bool:
        """Whether uploads are codes (False: float32)."""
        return self.bits != UNQUANTIZED_BITS


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP-SGD (Opacus): (ε, δ) for each client over the whole run.

    Measured by ``accountant``. The noise is secret (OS entropy on the client) unless
    ``noise_seeded``, which derives it from the run seed for bit-identical runs and so
    gives up the guarantee against anyone who knows the seed (the server).
    """

    enabled: bool = _setting("dp", True)
    target_epsilon: float = _setting("target-epsilon", 8.0)
    target_delta: float = _setting("target-delta", 1e-5)
    max_grad_norm: float = _setting("max-grad-norm", 1.0)
    accountant: Accountant = _setting("accountant", Accountant.PRV)
    noise_seeded: bool = _setting("dp-noise-seeded", False)

    def __post_init__(self) -> None:
        _positive(self, "target_epsilon", "max_grad_norm")
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError("target-delta", self.target_delta, "must be in (0, 1)")


@dataclass(frozen=True)
class DPQuantSettings:
    """DPQuant (paper A): a rotating, loss-prioritized subset of layers in low precision.

    k = round(``train_ratio`` · n) of the n quantizable layers run in ``format`` each
    epoch, drawn from π = softmax(-β L), L the EMA (weight α) of a DP estimate of each
    layer's loss increase, refreshed every ``period`` epochs. Defaults for the constants
    the paper leaves open:

    * β = 5: per-layer loss differences of 4-bit quantization were expected at ~0.05-0.5
      nats, so β·ΔL ~ 0.25-2.5 (β = 0 is PLS alone, β → ∞ always picks the k least
      sensitive layers). Measured on trained MNIST models they are 0.001-0.07, where β = 5
      is close to uniform; β = 200 gained nothing measurable (README, "Private training").
    * α = 0.5: an estimate every P = 2 epochs averages only q_a·|D| examples plus noise;
      α = 0.5 halves a single estimate's noise variance at stationarity (α/(2-α) = 1/3)
      while following the model within two estimates.
    * C_a = 1 (``clip``): bounds ‖r(x)‖₂ over all n layers; small-model vectors (n ≲ 10,
      entries ≲ 0.3) are mostly unclipped, so R̂ stays nearly unbiased.
    * σ_a = 3 (``noise``): one query (σ_a = 3, q_a = 0.05) every 2 epochs costs < 0.2% of
      ε = 8 and < 2% of ε = 2 over runs of up to 50 epochs; σ_a = 2 costs 1.8-4.7% at
      ε = 2, σ_a = 1 up to 37%. The std of R̂_i is σ_a·C_a / (q_a·|D|) = 0.012 for
      |D| = 5000.
    * q_a = 0.05 (``sample_rate``): ~250 examples of a 5000-example client, (n + 1)
      forward passes each.
    * P = 2 epochs (``period``): the paper's value.

    ``low_precision_speedup`` is s in the theoretical throughput formula (FP4 vs FP16).
    """

    policy: QuantPolicy = _setting("quant-policy", QuantPolicy.DPQUANT)
    train_ratio: float = _setting("quant-train-ratio", 0.5)
    format: QuantFormat = _setting("quant-format", QuantFormat.FP4)
    act_scale: ActScale = _setting("act-scale", ActScale.PER_SAMPLE)
    beta: float = _setting("dpquant-beta", 5.0)
    alpha: float = _setting("dpquant-alpha", 0.5)
    clip: float = _setting("dpquant-clip", 1.0)
    noise: float = _setting("dpquant-noise", 3.0)
    sample_rate: float = _setting("dpquant-sample-rate", 0.05)
    period: int = _setting("dpquant-period", 2)
    low_precision_speedup: float = _setting("low-precision-speedup", 4.0)

    def __post_init__(self) -> None:
        _positive_int(self, "period")
        _positive(self, "beta", "clip", "noise", "low_precision_speedup")
        _in_unit(self, "train_ratio", closed_below=True)
        _in_unit(self, "alpha", closed_below=False)
        _in_unit(self, "sample_rate", closed_below=False)

    @property
    def active(self) -> bool:
        """Whether any layer is ever quantized."""
        return self.policy is not QuantPolicy.NONE and self.train_ratio > 0.0


@dataclass(frozen=True)
class RobustSettings:
    """Aggregation and the bounds on hostile replies (``strategies.quantized``).

    Fewer accepted replies than ``min_replies`` leave the model unchanged; an update whose
    L2 norm exceeds ``update_norm_factor`` x the round's median is scaled down to it (0:
    off); a round whose aggregate step exceeds ``round_norm_factor`` x the median of the
    last rounds is discarded (0: off); error-weighted and fedavg cap a reply's share at
    ``weight_cap`` / K (0: no cap); ``num-examples`` must be below ``max_num_examples``;
    median and trimmed-mean tolerate ``byzantine_clients`` hostile replies (trimmed-mean
    cuts that many from each end).
    """

    aggregator: str = _setting("aggregator", "error-weighted")
    min_replies: int = _setting("min-replies", 1)
    update_norm_factor: float = _setting("update-norm-factor", 1.0)
    round_norm_factor: float = _setting("round-norm-factor", 10.0)
    weight_cap: float = _setting("weight-cap", 2.0)
    max_num_examples: int = _setting("max-num-examples", 10**6)
    byzantine_clients: int = _setting("byzantine-clients", 1)

    def __post_init__(self) -> None:
        _positive_int(self, "min_replies")
        if not self.aggregator:
            raise ConfigError("aggregator", self.aggregator, "must not be empty")
        _off_or_at_least_one(self, "update_norm_factor", "off")
        _off_or_at_least_one(self, "round_norm_factor", "off")
        if not (self.weight_cap == 0.0 or 1.0 <= self.weight_cap < math.inf):
            raise ConfigError(
                "weight-cap",
                self.weight_cap,
                "must be 0 (no cap) or finite and >= 1 (1: equal weights)",
            )
        if not self.max_num_examples > 1:
            raise ConfigError("max-num-examples", self.max_num_examples, "must be > 1")
        if self.byzantine_clients < 0:
            raise ConfigError("byzantine-clients", self.byzantine_clients, "must be >= 0")


@dataclass(frozen=True)
class PTQSettings:
    """Post-training quantization of the global model after the last round.

    Weights per output channel at ``weight_bits``, activations per tensor at
    ``act_bits`` (32: float); the first and last layers (and their inputs) at 8 bits.
    Without calibration data (``calibration`` NONE) only RTN of the weights is possible.
    ``iterations``: Adam steps per reconstruction unit (AdaRound, BRECQ, MRECG); ``top_k``:
    adjacent pairs merged by MRECG; ``qdrop`` the probability that an input element of a unit is
    kept quantized during reconstruction (QDrop, Wei et al. ICLR 2022; 1: off).
    """

    method: PTQMethod = _setting("ptq", PTQMethod.NONE)
    weight_bits: int = _setting("ptq-weight-bits", 4)
    act_bits: int = _setting("ptq-act-bits", 8)
    calibration: Calibration = _setting("ptq-calibration", Calibration.VALIDATION)
    calibration_size: int = _setting("ptq-calibration-size", 512)
    iterations: int = _setting("ptq-iterations", 500)
    top_k: int = _setting("ptq-top-k", 2)
    capacity: Capacity = _setting("ptq-capacity", Capacity.DATA_FREE)
    qdrop: float = _setting("ptq-qdrop", 1.0)
    seed: int = _setting("ptq-seed", 0)

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= MAX_CODE_BITS:
            raise ConfigError("ptq-weight-bits", self.weight_bits, f"must be 2..{MAX_CODE_BITS}")
        if not (2 <= self.act_bits <= MAX_CODE_BITS or self.act_bits == UNQUANTIZED_BITS):
            raise ConfigError(
                "ptq-act-bits", self.act_bits, f"must be 2..{MAX_CODE_BITS}, or 32 (float)"
            )
        _positive_int(self, "calibration_size", "iterations")
        if self.top_k < 0:
            raise ConfigError("ptq-top-k", self.top_k, "must be >= 0 (0: BRECQ's grouping)")
        _in_unit(self, "qdrop", closed_below=False)
        if self.calibration is Calibration.NONE and self.needs_data:
            raise ConfigError(
                "ptq",
                self.method.value,
                "reconstructs from calibration data, but ptq-calibration = 'none'; give"
                " ptq-calibration = 'validation', or use ptq = 'rtn' (the no-data path)",
            )
        if self.calibration is Calibration.NONE and self.act_bits != UNQUANTIZED_BITS:
            raise ConfigError(
                "ptq-act-bits",
                self.act_bits,
                "activation ranges need calibration data, but ptq-calibration = 'none';"
                " set ptq-act-bits = 32 (weights only) or ptq-calibration = 'validation'",
            )

    @property
    def needs_data(self) -> bool:
        """Whether the method reads calibration images (all but RTN and NONE)."""
        return self.method not in (PTQMethod.NONE, PTQMethod.RTN)


_SECTIONS: dict[str, type] = {
    "run": RunSettings,
    "train": TrainSettings,
    "codec": CodecSettings,
    "dp": DPSettings,
    "dpquant": DPQuantSettings,
    "robust": RobustSettings,
    "ptq": PTQSettings,
}


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration: one frozen, validated section per concern.

    Build it from Flower's flat mapping with :meth:`from_flower`; :meth:`to_flower` gives
    the mapping back; :meth:`with_overrides` changes keys by name (validated again).
    Checks that span sections (robust vs. sampled clients) run in ``__post_init__``.
    """

    run: RunSettings = field(default_factory=RunSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    codec: CodecSettings = field(default_factory=CodecSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    dpquant: DPQuantSettings = field(default_factory=DPQuantSettings)
    robust: RobustSettings = field(default_factory=RobustSettings)
    ptq: PTQSettings = field(default_factory=PTQSettings)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        sampled = self.run.sampled_per_round
        robust = self.robust
        if (
            robust.aggregator in ("median", "trimmed-mean")
            and 2 * robust.byzantine_clients >= sampled
        ):
            raise ConfigError(
                "byzantine-clients",
                robust.byzantine_clients,
                f"{robust.aggregator} cannot tolerate it: only {sampled} clients are sampled"
                f" per round and it needs more than twice as many"
                f" ({2 * robust.byzantine_clients + 1})",
            )
        if robust.min_replies > sampled:
            raise ConfigError(
                "min-replies",
                robust.min_replies,
                f"impossible: only {sampled} clients are sampled per round "
                f"(num-supernodes {self.run.num_supernodes} x fraction-train "
                f"{self.run.fraction_train}), so no round could ever update the model",
            )

    @property
    def privacy_warning(self) -> str | None:
        """What this run gives up, if its DP noise can be reproduced by the server."""
        if not (self.dp.enabled and self.dp.noise_seeded):
            return None
        return (
            "dp-noise-seeded = true: the DP noise, Poisson batches and DPQuant estimator "
            f"draws are derived from the run seed ({self.run.seed}), so whoever knows the seed "
            "(the server) can reproduce and subtract them; the reported epsilon does not "
            "hold against the server. Use it for reproducible experiments only."
        )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], *, strict: bool = False) -> Self:
        """Build from Flower's run config (kebab-case keys, TOML-typed values).

        Keys this class does not know are kept in ``extra`` (other features of the
        app may read them), or rejected when ``strict``.
        """
        index = _key_index()
        values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in index:
                if strict:
                    raise ConfigError(key, value, "unknown key")
                extra[key] = value
                continue
            section, name, kind = index[key]
            values[section][name] = _coerce(key, value, kind)
        sections = {name: _SECTIONS[name](**kwargs) for name, kwargs in values.items()}
        return cls(**sections, extra=extra)

    def to_flower(self) -> dict[str, Any]:
        """The flat kebab-case mapping (enums as their values)."""
        out: dict[str, Any] = {}
        for section in _SECTIONS:
            settings = getattr(self, section)
            for f in dataclasses.fields(settings):
                value = getattr(settings, f.name)
                out[_key_of(f)] = value.value if isinstance(value, enum.Enum) else value
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> Self:
        """A copy with the given run-config keys changed (TOML-typed values, validated)."""
        return type(self).from_flower({**self.to_flower(), **self.extra, **overrides})


def default_run_config() -> dict[str, Any]:
    """Every key with its default, as Flower's flat mapping."""
    return RunConfig().to_flower()


def _key_index() -> dict[str, tuple[str, str, Any]]:
    """run-config key -> (section, field name, field type)."""
    index: dict[str, tuple[str, str, Any]] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            index[_key_of(f)] = (section, f.name, hints[f.name])
    return index


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check a TOML value against the field's type; enums from their values."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        if isinstance(value, kind):
            return value
        choices = [m.value for m in kind]
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(key, value, f"must be one of {choices}")
        return kind(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be finite")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise TypeError(f"no coercion for {kind}")  # a programming error, not input
