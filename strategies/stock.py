"""Flower's stock strategies as the base of ``QuantizedStrategy``: build, save, restore.

A stock strategy (``FedAvg``, ``FedAdam``, ``FedAvgM``, ...) samples and configures the
clients and, with ``aggregator = "flwr:<Name>"``, aggregates the validated replies as
float32 ones. Its server-optimizer state (FedOpt's moments, FedAvgM's momentum, the
arrays they last saw) is its own business: this module never names any of it. A round
that must not count is undone by putting back a ``copy.deepcopy`` of the whole object,
and a checkpoint holds the whole object's data (:func:`object_state`), restored into a
freshly built strategy of the same class (:func:`restore_object_state`).
"""

from __future__ import annotations

import base64
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import FedAvg

from fedquant.reply import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES

STOCK_PREFIX = "flwr:"
"""``aggregator = "flwr:<Name>"`` wraps ``flwr.serverapp.strategy.<Name>``."""
_NO_FEDERATED_EVALUATION = "fraction_evaluate is set to 0.0"


class _Without(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def central_evaluation(strategy: type[FedAvg], **kwargs: Any) -> FedAvg:
    """``strategy(fraction_evaluate=0.0, **kwargs)`` with fedquant's record keys.

    Evaluation is central, on the server's test split. Flower warns at construction that
    federated evaluation will be skipped; that is this design, not something a user can
    act on, so the warning is dropped here (only that record, only while the strategy is
    built). The instruction and reply keys are those of :mod:`fedquant.reply`.
    """
    keys = {
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "weighted_by_key": NUM_EXAMPLES,
    }
    flwr_logger = logging.getLogger("flwr")
    quiet = _Without(_NO_FEDERATED_EVALUATION)
    flwr_logger.addFilter(quiet)
    try:
        return strategy(fraction_evaluate=0.0, **{**keys, **kwargs})
    finally:
        flwr_logger.removeFilter(quiet)


def stock_strategy(name: str, **kwargs: Any) -> FedAvg:
    """``flwr.serverapp.strategy.<name>`` with its defaults, built by :func:`central_evaluation`.

    Raises:
        ValueError: ``name`` is not a FedAvg-family strategy of Flower's.
    """
    stock = getattr(flwr_strategies, name, None)
    if not (isinstance(stock, type) and issubclass(stock, FedAvg)):
        raise ValueError(f"flwr.serverapp.strategy has no FedAvg-family strategy {name!r}")
    return central_evaluation(stock, **kwargs)


# ------------------------------------------------------------------------ checkpoints


def object_state(obj: object) -> dict[str, Any]:
    """Every instance attribute of ``obj`` that holds data, as JSON-serializable data.

    Data is None, bool, int, float, str, numpy arrays and scalars, Flower ``Array`` and
    ``ArrayRecord``, and lists, tuples and str-keyed dicts of data. Arrays are
    ``{"dtype", "shape", "data"}`` with ``data`` their C-order bytes in base64 (Flower
    Arrays their own bytes, with ``stype``), so they come back bit for bit with their
    dtype (a float list would lose float32 vs float64). Attributes holding behaviour
    (functions, methods, classes) are left out: the constructor sets them again. What a
    checkpoint stores is data, never code (no pickle).

    Raises:
        TypeError: an attribute holding neither data nor behaviour, naming it.
    """
    state: dict[str, Any] = {}
    for name, value in vars(obj).items():
        if _is_behaviour(value):
            continue
        try:
            state[name] = _encode(value)
        except TypeError as err:
            raise TypeError(f"{type(obj).__name__}.{name}: {err}") from None
    return state


def restore_object_state(obj: object, state: Mapping[str, Any], *, saved_class: str) -> None:
    """Put :func:`object_state` of a ``saved_class`` object back into ``obj``, exactly.

    Nothing is changed unless all of it fits.

    Raises:
        ValueError: ``obj`` is not of class ``saved_class``, or ``state`` has attributes
            ``obj`` does not keep; the message names both classes and those attributes.
    """
    foreign = sorted(set(state) - set(vars(obj)))
    if foreign or saved_class != type(obj).__name__:
        kept = f", which keeps {foreign} that {type(obj).__name__} does not" if foreign else ""
        raise ValueError(
            f"state was saved from a {saved_class}{kept}; it cannot be restored into a "
            f"{type(obj).__name__}"
        )
    for name, value in state.items():
        setattr(obj, name, _decode(value))


def _is_behaviour(value: object) -> bool:
    return inspect.isroutine(value) or isinstance(value, type)


def _encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(value: object) -> Any:
    if value is None or type(value) in (bool, int, float, str):  # not enums: they'd come back str
        return value
    if isinstance(value, np.ndarray | np.generic):
        array = np.ascontiguousarray(value)
        if array.dtype.hasobject:
            raise TypeError("an object array is not data")
        tag = "ndarray" if isinstance(value, np.ndarray) else "numpy-scalar"
        data = _encode_bytes(array.tobytes())
        return {tag: {"dtype": array.dtype.str, "shape": list(array.shape), "data": data}}
    if isinstance(value, Array):
        fields = {"dtype": value.dtype, "shape": list(value.shape), "stype": value.stype}
        return {"array": {**fields, "data": _encode_bytes(value.data)}}
    if isinstance(value, ArrayRecord):
        return {"array-record": {k: _encode(v) for k, v in value.items()}}
    if type(value) in (list, tuple):  # not subclasses: they would come back as these
        return {type(value).__name__: [_encode(v) for v in value]}  # type: ignore[attr-defined]
    if type(value) is dict and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    raise TypeError(f"{type(value).__name__} is not data")


def _decode(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, body),) = value.items()
    if tag in ("ndarray", "numpy-scalar"):
        flat = np.frombuffer(base64.b64decode(body["data"]), dtype=np.dtype(body["dtype"]))
        array = flat.reshape(tuple(body["shape"])).copy()  # writable, owns its memory
        return array if tag == "ndarray" else array[()]
    if tag == "array":
        data = base64.b64decode(body["data"])
        return Array(
            dtype=body["dtype"], shape=tuple(body["shape"]), stype=body["stype"], data=data
        )
    if tag == "array-record":
        return ArrayRecord({k: _decode(v) for k, v in body.items()})
    if tag == "list":
        return [_decode(v) for v in body]
    if tag == "tuple":
        return tuple(_decode(v) for v in body)
    if tag == "dict":
        return {k: _decode(v) for k, v in body.items()}
    raise ValueError(f"unknown state tag {tag!r}")
