"""The run configuration: Flower run-config keys (kebab-case), validated once.

Both apps and the launcher build a :class:`RunConfig` from Flower's flat
``context.run_config`` mapping. Every value is checked in ``__post_init__``; a bad one
raises :class:`ConfigError` naming the key and the value, before any client starts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedquant import dpquant
from fedquant.accounting import Accountant
from fedquant.codec import ClipRule, Rounding
from fedquant.data import Partitioning
from fedquant.dpquant import QuantPolicy
from fedquant.fakequant import ActScale, QuantFormat
from fedquant.models import ModelName

UNQUANTIZED_BITS = 32


class ConfigError(ValueError):
    """A run-config key has an invalid value (or is unknown)."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"run config key '{key}' = {value!r}: {reason}")
        self.key = key
        self.value = value


class PayloadMode(enum.Enum):
    """What a client uploads.

    UPDATE: Δ = w_local − w_global, quantized (the default; Δ is small and centred,
    so the clip threshold is tight).
    WEIGHTS: w_local itself, quantized: the setting of Bozorgasl & Chen (2024), who
    send quantized weights and their quantization error.
    """

    UPDATE = "update"
    WEIGHTS = "weights"


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """All run-config keys with their defaults (mirrored in pyproject.toml)."""

    num_server_rounds: int = 5
    num_supernodes: int = 10
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    local_epochs: int = 1
    local_steps: int = 20
    # Local SGD. Under DP-SGD the step is dp_lr: a mean of per-example gradients clipped
    # to norm C plus noise is a much smaller, noisier signal than a raw gradient, and
    # DP-SGD wants large batches and large steps (De et al. 2022, arXiv 2204.13650);
    # lr is the step of non-private training, where 1.0 would diverge.
    batch_size: int = 256
    lr: float = 0.05
    dp_lr: float = 1.0
    momentum: float = 0.9
    model: ModelName = ModelName.CNN
    bits: int = 4
    clip: ClipRule = ClipRule.OCTAV
    rounding: Rounding = Rounding.STOCHASTIC
    payload: PayloadMode = PayloadMode.UPDATE
    aggregator: str = "error-weighted"
    mse_floor: float = 1e-12
    max_clip: float = 1e4
    partitioning: Partitioning = Partitioning.IID
    dirichlet_alpha: float = 0.5
    seed: int = 0
    out_dir: str = "outputs"
    round_timeout: float = 600.0
    eval_every: int = 1
    # Faults and hostile replies (strategies.quantized): fewer accepted replies than
    # min_replies leave the model unchanged; an update whose L2 norm exceeds
    # update_norm_factor x the round's median is scaled down to it (0: off); a round
    # whose aggregate step exceeds round_norm_factor x the median of the last rounds
    # is discarded (0: off); error-weighted and fedavg cap a reply's share at
    # weight_cap / K (0: no cap); num-examples must be below max_num_examples; median and
    # trimmed-mean tolerate byzantine_clients hostile replies (trimmed-mean cuts that
    # many from each end).
    min_replies: int = 1
    update_norm_factor: float = 1.0
    round_norm_factor: float = 10.0
    weight_cap: float = 2.0
    max_num_examples: int = 10**6
    byzantine_clients: int = 1
    # Checkpoints: resume continues from the last complete round in out_dir. Client
    # privacy/DPQuant state goes to client_state_dir/<partition-id> when set (a
    # deployed SuperNode's node config "state-dir" takes precedence).
    resume: bool = False
    client_state_dir: str = ""
    # Sample-level DP-SGD (Opacus): (ε, δ) for each client over the whole run, measured
    # by `accountant`. The noise is secret (OS entropy on the client) unless
    # dp_noise_seeded, which derives it from the run seed for bit-identical runs and so
    # gives up the guarantee against anyone who knows the seed (the server).
    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Accountant = Accountant.PRV
    dp_noise_seeded: bool = False
    # DPQuant (paper A): which layers train in low precision, and its open knobs.
    quant_policy: QuantPolicy = QuantPolicy.DPQUANT
    quant_train_ratio: float = 0.5
    quant_format: QuantFormat = QuantFormat.FP4
    act_scale: ActScale = ActScale.PER_SAMPLE
    dpquant_beta: float = dpquant.DEFAULT_BETA
    dpquant_alpha: float = dpquant.DEFAULT_ALPHA
    dpquant_clip: float = dpquant.DEFAULT_ESTIMATOR_CLIP
    dpquant_noise: float = dpquant.DEFAULT_ESTIMATOR_NOISE
    dpquant_sample_rate: float = dpquant.DEFAULT_ESTIMATOR_RATE
    dpquant_period: int = dpquant.DEFAULT_PERIOD
    low_precision_speedup: float = 4.0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _positive_int(self, "num_server_rounds")
        _positive_int(self, "num_supernodes")
        _positive_int(self, "min_train_nodes")
        _positive_int(self, "local_epochs")
        _positive_int(self, "batch_size")
        _positive_int(self, "eval_every")
        _positive_int(self, "dpquant_period")
        _positive_int(self, "min_replies")
        for name in ("target_epsilon", "max_grad_norm", "dpquant_beta", "dpquant_clip",
                     "dpquant_noise", "low_precision_speedup"):
            if not getattr(self, name) > 0.0:
                raise ConfigError(_key(name), getattr(self, name), "must be > 0")
        if not 0.0 < self.target_delta < 1.0:
            raise ConfigError("target-delta", self.target_delta, "must be in (0, 1)")
        for name in ("quant_train_ratio",):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(_key(name), getattr(self, name), "must be in [0, 1]")
        for name in ("dpquant_alpha", "dpquant_sample_rate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(_key(name), getattr(self, name), "must be in (0, 1]")
        if self.local_steps < 0:
            raise ConfigError("local-steps", self.local_steps, "must be >= 0 (0: full epochs)")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("fraction-train", self.fraction_train, "must be in (0, 1]")
        for name in ("lr", "dp_lr", "mse_floor", "max_clip", "dirichlet_alpha", "round_timeout"):
            if not getattr(self, name) > 0.0:
                raise ConfigError(_key(name), getattr(self, name), "must be > 0")
        for name in ("update_norm_factor", "round_norm_factor"):
            factor = getattr(self, name)
            if not (factor == 0.0 or 1.0 <= factor < math.inf):
                raise ConfigError(_key(name), factor, "must be 0 (off) or finite and >= 1")
        if not (self.weight_cap == 0.0 or 1.0 <= self.weight_cap < math.inf):
            raise ConfigError(
                "weight-cap", self.weight_cap,
                "must be 0 (no cap) or finite and >= 1 (1: equal weights)",
            )
        if not self.max_num_examples > 1:
            raise ConfigError("max-num-examples", self.max_num_examples, "must be > 1")
        if self.byzantine_clients < 0:
            raise ConfigError("byzantine-clients", self.byzantine_clients, "must be >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", self.momentum, "must be in [0, 1)")
        if not (1 <= self.bits <= 8 or self.bits == UNQUANTIZED_BITS):
            raise ConfigError("bits", self.bits, "must be 1..8, or 32 for unquantized")
        if not self.aggregator:
            raise ConfigError("aggregator", self.aggregator, "must not be empty")
        if not self.out_dir:
            raise ConfigError("out-dir", self.out_dir, "must not be empty")
        if self.min_train_nodes > self.num_supernodes:
            raise ConfigError(
                "min-train-nodes", self.min_train_nodes, "must be <= num-supernodes"
            )
        # Flower's FedAvg samples max(int(N * fraction), min-train-nodes) clients a round.
        sampled = max(int(self.num_supernodes * self.fraction_train), self.min_train_nodes)
        if self.aggregator in ("median", "trimmed-mean") and 2 * self.byzantine_clients >= sampled:
            raise ConfigError(
                "byzantine-clients", self.byzantine_clients,
                f"{self.aggregator} cannot tolerate it: only {sampled} clients are sampled"
                f" per round and it needs more than twice as many"
                f" ({2 * self.byzantine_clients + 1})",
            )
        if self.min_replies > sampled:
            raise ConfigError(
                "min-replies", self.min_replies,
                f"impossible: only {sampled} clients are sampled per round "
                f"(num-supernodes {self.num_supernodes} x fraction-train "
                f"{self.fraction_train}), so no round could ever update the model",
            )

    @property
    def quantized(self) -> bool:
        return self.bits != UNQUANTIZED_BITS

    @property
    def privacy_warning(self) -> str | None:
        """What this run gives up, if its DP noise can be reproduced by the server."""
        if not (self.dp and self.dp_noise_seeded):
            return None
        return (
            "dp-noise-seeded = true: the DP noise, Poisson batches and DPQuant estimator "
            f"draws are derived from the run seed ({self.seed}), so whoever knows the seed "
            "(the server) can reproduce and subtract them; the reported epsilon does not "
            "hold against the server. Use it for reproducible experiments only."
        )

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], *, strict: bool = False) -> RunConfig:
        """Build from Flower's run config (kebab-case keys, TOML-typed values).

        Keys this class does not know are kept in ``extra`` (other features of the
        app may read them), or rejected when ``strict``.
        """
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                if strict:
                    raise ConfigError(key, value, "unknown key")
                extra[key] = value
                continue
            known[name] = _coerce(key, value, fields[name].type)
        return cls(**known, extra=extra)

    def to_flower(self) -> dict[str, Any]:
        """The flat kebab-case mapping (enums as their values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[_key(f.name)] = value.value if hasattr(value, "value") else value
        return out


def _positive_int(config: RunConfig, name: str) -> None:
    if getattr(config, name) < 1:
        raise ConfigError(_key(name), getattr(config, name), "must be >= 1")


_ENUMS = {
    "Accountant": Accountant,
    "QuantPolicy": QuantPolicy,
    "QuantFormat": QuantFormat,
    "ActScale": ActScale,
    "ModelName": ModelName,
    "ClipRule": ClipRule,
    "Rounding": Rounding,
    "PayloadMode": PayloadMode,
    "Partitioning": Partitioning,
}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Check a TOML value against the field's annotated type (a string here)."""
    type_name = str(type_name)
    if type_name in _ENUMS:
        enum_cls = _ENUMS[type_name]
        choices = [m.value for m in enum_cls]
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(key, value, f"must be one of {choices}")
        return enum_cls(value)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, value, "must be finite")
        return float(value)
    if type_name == "str":
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise TypeError(f"no coercion for {type_name}")  # a programming error, not input
