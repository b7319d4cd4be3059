"""Fuzzing QuantizedStrategy.aggregate_train with one malformed reply among good ones.

Every example hands the strategy three valid replies and one reply from node 99
with one field broken (drawn by hypothesis, family by family). Whatever the field,
the property is the same: the bad reply is counted as rejected (or failed, for an
error message), nothing else escapes, the three good replies are aggregated, and the
new global model is bit for bit what the good replies alone give.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedquant.config import ClipRule, Rounding
from fedquant.payload import CODES_KEY, MAX_MSE, META_KEY
from fedquant.reply import MAX_NUM_EXAMPLES, METRICS_KEY, REPLY_METRICS, ReplyLimits, encode_reply
from strategies.quantized import QuantizedStrategy
from tests.conftest import SMALL_MODEL, small_model, train_instruction

SHAPES = SMALL_MODEL
ROUND = 3
BAD_NODE = 99
MAX_CLIP = 1e4
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Mutation = Callable[[Message, st.DataObject], Message]


# ------------------------------------------------------------------ replies


@functools.cache
def _content(node: int, bits: int) -> RecordDict:
    g = torch.Generator().manual_seed(node)
    update = {k: 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    metrics = {
        "num-examples": 10 * node + 5,
        "server-round": ROUND,
        "epsilon": 1.0,
        "noise-multiplier": 1.1,
        "speedup": 1.5,
        "local-epochs": 2,
        "quantized-epochs": [1, 2],
    }
    return encode_reply(
        update,
        metrics,
        bits=bits,
        clip=ClipRule.OCTAV,
        rounding=Rounding.STOCHASTIC,
        generator=g,
    )


def reply(node: int, bits: int = 4) -> Message:
    """A valid reply, with its own copy of the records (the fuzzer edits them)."""
    return Message(content=copy.deepcopy(_content(node, bits)), reply_to=train_instruction(node))


GOOD_NODES = (1, 2, 3)
# The run's privacy budget and caps: replies must stay within them.
LIMITS = ReplyLimits(max_epsilon=2.0, max_speedup=4.0, max_clip=MAX_CLIP)


@functools.cache
def good() -> list[Message]:
    """The valid replies (built once, inside a test: messages need a task identity)."""
    return [reply(node) for node in GOOD_NODES]


def aggregate(replies: list[Message]) -> tuple[QuantizedStrategy, ArrayRecord | None, MetricRecord]:
    strategy = QuantizedStrategy(limits=LIMITS, global_model=small_model())
    arrays, metrics = strategy.aggregate_train(ROUND, replies)
    assert metrics is not None
    return strategy, arrays, metrics


@functools.cache
def good_only() -> dict[str, np.ndarray]:
    _, arrays, metrics = aggregate(good())
    assert arrays is not None and metrics["accepted"] == 3
    return {k: v.numpy() for k, v in arrays.items()}


# ------------------------------------------------------------------ drawn values

names = st.sampled_from(sorted(SHAPES))
huge_ints = st.integers(min_value=2**63, max_value=10**400) | st.integers(max_value=-(2**63))
# Ints no float can hold (a float field given one must not overflow the server).
beyond_float = st.integers(min_value=2**1024, max_value=10**400) | st.integers(
    min_value=-(10**400), max_value=-(2**1024)
)
not_numbers = st.one_of(
    st.text(max_size=5),
    st.binary(max_size=5),
    st.booleans(),
    st.lists(st.integers(0, 9), max_size=3),
)
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])
other_keys = st.text(min_size=1, max_size=12).filter(lambda s: s not in SHAPES)


def meta(msg: Message) -> ConfigRecord:
    return msg.content[META_KEY]


def replace_array(msg: Message, name: str, **changes: object) -> None:
    old = msg.content[CODES_KEY][name]
    fields = {"dtype": old.dtype, "shape": old.shape, "stype": old.stype, "data": old.data}
    msg.content[CODES_KEY][name] = Array(**{**fields, **changes})


def replace_record(msg: Message, key: str, record: object) -> None:
    del msg.content[key]
    msg.content[key] = record


# ------------------------------------------------------------------ mutations


def truncated_codes(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    raw = msg.content[CODES_KEY][name].data
    cut = data.draw(st.integers(1, len(raw)))
    keep = data.draw(st.sampled_from(["head", "tail"]))
    replace_array(msg, name, data=raw[:-cut] if keep == "head" else raw[cut:])
    return msg


def oversized_codes(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    raw = msg.content[CODES_KEY][name].data
    replace_array(msg, name, data=raw + data.draw(st.binary(min_size=1, max_size=64)))
    return msg


def garbage_codes(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    size = len(msg.content[CODES_KEY][name].data)
    garbage = data.draw(st.binary(max_size=2 * size).filter(lambda b: len(b) != size))
    replace_array(msg, name, data=garbage)
    return msg


def float32_garbage(msg: Message, data: st.DataObject) -> Message:
    """An unquantized (bits 32) reply whose .npy buffer is broken or non-finite."""
    msg = reply(BAD_NODE, bits=32)
    name = data.draw(names)
    raw = msg.content[CODES_KEY][name].data
    how = data.draw(st.sampled_from(["truncate", "extend", "header", "nonfinite", "dtype"]))
    if how == "truncate":
        replace_array(msg, name, data=raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "extend":
        replace_array(msg, name, data=raw + data.draw(st.binary(min_size=1, max_size=16)))
    elif how == "header":
        # The magic string and major version; a flip in the header's padding spaces
        # (say, to a tab) could leave a valid file.
        at = data.draw(st.integers(0, 6))
        flipped = bytes([raw[at] ^ data.draw(st.integers(1, 255))])
        replace_array(msg, name, data=raw[:at] + flipped + raw[at + 1 :])
    elif how == "nonfinite":
        values = np.zeros(SHAPES[name], np.float32)
        values.flat[data.draw(st.integers(0, values.size - 1))] = data.draw(not_finite)
        msg.content[CODES_KEY][name] = Array(values)
    else:
        msg.content[CODES_KEY][name] = Array(np.zeros(SHAPES[name], np.float64))
    return msg


def missing_tensor(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    where = data.draw(st.sampled_from(["both", "codes", "meta"]))
    if where in ("both", "codes"):
        del msg.content[CODES_KEY][name]
    if where in ("both", "meta"):
        for field in ("bits", "clip", "mse"):
            del meta(msg)[f"{name}/{field}"]
    return msg


def extra_tensor(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(other_keys)
    shape = tuple(data.draw(st.lists(st.integers(0, 5), max_size=3)))
    values = np.zeros(shape, np.float32)
    msg.content[CODES_KEY][name] = Array(values)
    meta(msg)[f"{name}/bits"] = 32
    meta(msg)[f"{name}/clip"] = 0.0
    meta(msg)[f"{name}/mse"] = 0.0
    return msg


def renamed_tensor(msg: Message, data: st.DataObject) -> Message:
    old, new = data.draw(names), data.draw(other_keys)
    array = msg.content[CODES_KEY][old]
    del msg.content[CODES_KEY][old]
    msg.content[CODES_KEY][new] = array
    for field in ("bits", "clip", "mse"):
        meta(msg)[f"{new}/{field}"] = meta(msg)[f"{old}/{field}"]
        del meta(msg)[f"{old}/{field}"]
    return msg


def reshaped_tensor(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    shape = SHAPES[name]
    same_size = [(math.prod(shape),), (1, *shape), tuple(reversed(shape)), (*shape, 1)]
    drawn = st.lists(st.integers(-3, 40), max_size=5).map(tuple)
    new = data.draw((st.sampled_from(same_size) | drawn).filter(lambda s: s != shape))
    replace_array(msg, name, shape=new)
    return msg


def bad_bits(msg: Message, data: st.DataObject) -> Message:
    invalid_ints = st.integers(-(2**63), 2**63).filter(lambda b: not (1 <= b <= 8 or b == 32))
    value = data.draw(invalid_ints | st.floats(allow_nan=True) | not_numbers | huge_ints)
    meta(msg)[f"{data.draw(names)}/bits"] = value
    return msg


def bad_clip(msg: Message, data: st.DataObject) -> Message:
    value = data.draw(
        not_finite
        | st.floats(max_value=-1e-300)
        | st.floats(min_value=MAX_CLIP, exclude_min=True)
        | st.integers(min_value=int(MAX_CLIP) + 1)
        | huge_ints
        | not_numbers
    )
    meta(msg)[f"{data.draw(names)}/clip"] = value
    return msg


def bad_mse(msg: Message, data: st.DataObject) -> Message:
    value = data.draw(
        not_finite
        | st.floats(max_value=-1e-300)
        | st.floats(min_value=MAX_MSE, exclude_min=True)
        | st.integers(min_value=2 * int(MAX_MSE))
        | beyond_float
        | not_numbers
    )
    meta(msg)[f"{data.draw(names)}/mse"] = value
    return msg


def bad_meta_keys(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    how = data.draw(st.sampled_from(["drop", "unknown", "no-separator"]))
    if how == "drop":
        del meta(msg)[f"{name}/{data.draw(st.sampled_from(['bits', 'clip', 'mse']))}"]
    elif how == "unknown":
        field = data.draw(st.text(max_size=6).filter(lambda f: f not in ("bits", "clip", "mse")))
        meta(msg)[f"{name}/{field}"] = 1.0
    else:
        meta(msg)[data.draw(st.text(max_size=8).filter(lambda k: "/" not in k))] = 4
    return msg


def bad_array_type(msg: Message, data: st.DataObject) -> Message:
    name = data.draw(names)
    field = data.draw(st.sampled_from(["dtype", "stype"]))
    current = getattr(msg.content[CODES_KEY][name], field)
    value = data.draw(
        (
            st.sampled_from(["float32", "numpy.ndarray", "uint8", "bitpacked"])
            | st.text(max_size=8)
        ).filter(lambda v: v != current)
    )
    replace_array(msg, name, **{field: value})
    return msg


def other_record_type(msg: Message, data: st.DataObject) -> Message:
    key = data.draw(st.sampled_from([CODES_KEY, META_KEY, METRICS_KEY]))
    old = msg.content[key]
    numeric = {
        k: v
        for k, v in (old.items() if key != CODES_KEY else [])
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    options = {
        "array": lambda: ArrayRecord({"x": Array(np.zeros(2, np.float32))}),
        "config": lambda: ConfigRecord(dict(old) if key == METRICS_KEY else {"x": 1}),
        "metric": lambda: MetricRecord(numeric or {"x": 1}),
    }
    wrong = {
        CODES_KEY: ["config", "metric"],
        META_KEY: ["array", "metric"],
        METRICS_KEY: ["array", "config"],
    }[key]
    replace_record(msg, key, options[data.draw(st.sampled_from(wrong))]())
    return msg


def missing_or_extra_record(msg: Message, data: st.DataObject) -> Message:
    if data.draw(st.booleans()):
        del msg.content[data.draw(st.sampled_from([CODES_KEY, META_KEY, METRICS_KEY]))]
    else:
        key = data.draw(
            st.text(min_size=1, max_size=8).filter(
                lambda k: k not in (CODES_KEY, META_KEY, METRICS_KEY)
            )
        )
        msg.content[key] = MetricRecord({"x": 1})
    return msg


def missing_metric(msg: Message, data: st.DataObject) -> Message:
    del msg.content[METRICS_KEY][data.draw(st.sampled_from(["num-examples", "server-round"]))]
    return msg


def bad_num_examples(msg: Message, data: st.DataObject) -> Message:
    value = data.draw(
        st.integers(max_value=0)
        | st.integers(min_value=MAX_NUM_EXAMPLES)  # the limit is exclusive
        | huge_ints
        | st.floats()  # even 100.0: a count is an int
        | not_finite
        | st.lists(st.integers(1, 9), max_size=3)
    )
    msg.content[METRICS_KEY]["num-examples"] = value
    return msg


def other_round(msg: Message, data: st.DataObject) -> Message:
    value = data.draw(
        st.integers().filter(lambda r: r != ROUND) | huge_ints | st.floats() | st.just([ROUND])
    )
    msg.content[METRICS_KEY]["server-round"] = value
    return msg


def bad_other_metric(msg: Message, data: st.DataObject) -> Message:
    key, value = data.draw(
        st.one_of(
            st.tuples(
                st.just("epsilon"),
                st.floats(max_value=-1e-300)
                | st.floats(min_value=2.0 * 1.0101)  # beyond the budget and its tolerance
                | not_finite
                | beyond_float,
            ),
            st.tuples(
                st.just("noise-multiplier"),
                st.floats(max_value=0.0) | st.floats(min_value=1e6) | not_finite | beyond_float,
            ),
            st.tuples(
                st.just("speedup"),
                st.floats(max_value=0.0) | st.floats(min_value=4.001) | not_finite | beyond_float,
            ),
            st.tuples(st.just("local-epochs"), st.floats() | st.integers(max_value=-1) | huge_ints),
            # A metric the reply schema does not have (e.g. a loss the server never asked for).
            st.tuples(
                st.text(min_size=1, max_size=12).filter(lambda k: k not in REPLY_METRICS),
                st.floats(allow_nan=False) | st.integers(),
            ),
            st.tuples(
                st.just("quantized-epochs"),
                st.lists(st.integers(), min_size=1, max_size=3).filter(
                    lambda v: any(not 0 <= e <= 2 for e in v)
                )
                | st.lists(st.floats(0, 2), min_size=1, max_size=3)
                | st.integers(0, 2),
            ),
        )
    )
    msg.content[METRICS_KEY][key] = value
    return msg


def error_message(msg: Message, data: st.DataObject) -> Message:
    error = Error(code=data.draw(st.integers(0, 10**6)), reason=data.draw(st.text(max_size=20)))
    return Message(error, reply_to=train_instruction(BAD_NODE))


def bad_budget_status(msg: Message, data: st.DataObject) -> Message:
    """A ``budget-exhausted`` status reply (metrics only) with a bad field."""
    metrics = {"budget-exhausted": 1, "server-round": ROUND, "epsilon": 2.0}
    key = data.draw(st.sampled_from(["server-round", "epsilon"]))
    if data.draw(st.booleans()):
        del metrics[key]
    elif key == "server-round":
        metrics[key] = data.draw(st.integers().filter(lambda r: r != ROUND) | st.floats())
    else:
        metrics[key] = data.draw(
            st.floats(max_value=-1e-300) | st.floats(min_value=2.03) | not_finite | beyond_float
        )
    content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=train_instruction(BAD_NODE))


MUTATIONS: list[Mutation] = [
    truncated_codes,
    oversized_codes,
    garbage_codes,
    float32_garbage,
    missing_tensor,
    extra_tensor,
    renamed_tensor,
    reshaped_tensor,
    bad_bits,
    bad_clip,
    bad_mse,
    bad_meta_keys,
    bad_array_type,
    other_record_type,
    missing_or_extra_record,
    missing_metric,
    bad_num_examples,
    other_round,
    bad_other_metric,
    error_message,
    bad_budget_status,
]


# ------------------------------------------------------------------ the property


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__)
@FUZZ
@given(data=st.data(), position=st.integers(0, len(GOOD_NODES)))
def test_a_malformed_reply_is_rejected_and_changes_nothing(
    mutate: Mutation, data: st.DataObject, position: int
) -> None:
    bad = mutate(reply(BAD_NODE), data)
    replies = [*good()[:position], bad, *good()[position:]]
    strategy, arrays, metrics = aggregate(replies)
    assert BAD_NODE not in strategy.epsilon_by_node  # nothing of it was kept
    counted = "failed" if bad.has_error() else "rejected"
    assert metrics[counted] == 1
    assert metrics["rejected"] + metrics["failed"] + metrics["budget-exhausted"] == 1
    assert metrics["accepted"] == 3 and metrics["skipped"] == 0
    assert arrays is not None
    for name, want in good_only().items():
        np.testing.assert_array_equal(arrays[name].numpy(), want)


def test_the_unmutated_reply_is_accepted() -> None:
    """The fuzzer's starting point is valid, so each rejection is the mutation's doing."""
    for bits in (4, 32):
        _, arrays, metrics = aggregate([*good(), reply(BAD_NODE, bits=bits)])
        assert metrics["accepted"] == 4 and metrics["rejected"] == 0
        assert arrays is not None
