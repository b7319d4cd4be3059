"""Benchmark: per-round overhead of fedquant's codec and strategy over stock float32 FedAvg.

    python -m sims.bench.overhead             # 10 clients, 5 rounds x 3 repeats (see --help)
    python -m sims.bench.overhead --dp        # adds a row with DP-SGD training on

Two federations run in this one process, round for round, alternating which goes first,
so that machine noise falls on both alike:

- fedquant: a ClientApp that replies as ``clients.client_app.app`` does (4-bit codes of
  Δ: ``clients.client_app.quantized_reply``, the app's own reply step), and the
  ``QuantizedStrategy`` of ``strategy_from_config`` (error-weighted rule);
- stock: a ClientApp that replies as Flower's stock apps do, with the float32 local
  weights (``RecordDict({"arrays": ArrayRecord(state_dict), "metrics":
  MetricRecord({"num-examples": ...})})``: :func:`float32_reply`), aggregated by
  Flower's stock ``flwr.serverapp.strategy.FedAvg``.

Why it is fair: both ClientApps (:func:`timed_app`) receive and train through the same
unchanged ``clients.client_app.receive`` and ``train_received``, the latter timed: same
nodes and partitions, same seeds, same model,
a fixed number of local steps, DP and training quantization as configured for both
(off by default). The two global models drift apart after round 1, but training cost
does not depend on the weights. Both go through the same ``InProcessGrid`` (subclassed
here, for timing and transport) and the same per-round strategy calls as
``sims.app.server_app.run``, without its central evaluation and checkpoint writing, which
are the same for both and no part of the codec or the strategy.

Each round's time, by the wall clock and by this process's CPU time (which the load
of other processes on a shared machine inflates far less), is split into

- train: ``train_received`` in every client (the same work on both sides);
- encode: the rest of the ClientApp call: receiving the instruction (decoding a
  quantized downlink's deltas, node state) and Δ, quantize and pack vs building the
  float32 ``ArrayRecord``, plus the metrics record;
- wire: Flower 1.39's own transport byte work for each train message and reply: the
  sender computes every nested object's ID (SHA-256) and deflates it, as the SuperNode
  and the SuperLink grid do; the receiver checks each object's hash and structure, as
  the SuperLink's object store does, and inflates the message. Only the sockets are
  missing. Without a quantized downlink, the float32 global model goes down on both
  sides;
- server: ``configure_train`` + ``aggregate_train`` (fedquant: validate, decode,
  norm bound, error-weighted aggregation and round metrics; stock: FedAvg's weighted
  mean and metric averaging).

Reports the median of each over rounds x repeats, the overhead ratio
(fedquant − stock) / stock of the whole round and of its non-training part, and the
uplink bytes per round (the deflated objects actually pushed). The headline ratio
counts training once for both sides (see :func:`overhead`): on a shared machine the
two sides' train medians can differ by several percent from noise alone, as much as
the 5% target itself. Writes the report to
``--out``/bench.md and every timed round to ``--out``/samples.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_id,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    validate_object_content,
)

from clients.client_app import LocalRound, quantized_reply, receive, train_received
from fedquant.config import RunConfig
from fedquant.models import build_model
from fedquant.reply import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from fedquant.seeds import node_seed
from sims.bench.sweep import write_report
from sims.launch.inprocess import InProcessGrid
from strategies.quantized import strategy_from_config

PHASES = ("train", "encode", "wire", "server")
COLUMNS = (*PHASES, "rest", "round")  # rest: the round minus training
CLOCKS = ("wall", "cpu")
Samples = Sequence[Mapping[str, float]]  # one mapping per timed round
TARGET = 0.05  # the overhead goal: fedquant's round at most 5% slower than stock FedAvg


@dataclass
class RoundClock:
    """Seconds spent in each phase of the current round, and the bytes pushed uplink.

    Keys are ``"wall-<phase>"`` (``time.perf_counter``) and ``"cpu-<phase>"``
    (``time.process_time``: this process's CPU time, which other processes' load on a
    shared machine inflates far less than wall time).
    """

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    uplink_bytes: int = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall and CPU seconds to phase ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[f"wall-{name}"] += time.perf_counter() - wall
            self.seconds[f"cpu-{name}"] += time.process_time() - cpu

    def reset(self) -> None:
        """Start a new round: every phase at 0 s, no bytes."""
        self.seconds = defaultdict(float)
        self.uplink_bytes = 0


def transmit(msg: Message) -> tuple[Message, int]:
    """``msg`` as the receiver gets it through Flower's object transport; bytes moved.

    Sender: object IDs (SHA-256 of each deflated object) and deflated contents of the
    message and everything nested in it (``flwr.supernode.start_client_internal`` and
    ``flwr.superlink.grid.http_grid`` do the same). Receiver: each object's hash and
    layout checked (the object store's ``put``), then the message inflated.
    """
    with no_object_id_recompute():
        msg_id = msg.object_id
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    nbytes = sum(len(c) for c in contents.values())
    for oid, content in contents.items():
        if get_object_id(content) != oid:
            raise ValueError(f"object {oid} does not match its content hash")
        validate_object_content(content=content)
    received = inflate_object_from_contents(msg_id, contents)
    assert isinstance(received, Message)
    received.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return received, nbytes


Reply = Callable[[Message, LocalRound], Message]
"""A ClientApp's reply to a training message, built from its finished local round."""


def float32_reply(msg: Message, result: LocalRound) -> Message:
    """A stock reply, as Flower's quickstart apps send: float32 local weights, example count."""
    metrics = MetricRecord({NUM_EXAMPLES: result.metrics[NUM_EXAMPLES]})
    content = RecordDict({ARRAYS_KEY: ArrayRecord(result.local_state), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def timed_app(reply: Reply, clock: RoundClock) -> ClientApp:
    """A ClientApp that receives the instruction, trains (timed as "train"), then replies.

    Receiving (node state, and decoding a quantized downlink) and replying are the
    client's codec work; only ``clients.client_app.train_received`` is training.

    A node out of privacy budget stops the benchmark (RuntimeError): it would do less
    work than its twin on the other side.
    """
    app = ClientApp()

    @app.train()
    def timed_train(msg: Message, context: Context) -> Message:
        received = receive(msg, context)
        with clock.phase("train"):
            result = train_received(received, context)
        if result.exhausted_epsilon is not None:
            raise RuntimeError(
                f"node {context.node_id} exhausted its privacy budget in round "
                f"{result.server_round}: both sides must train every round"
            )
        return reply(msg, result)

    return app


class TimedGrid(InProcessGrid):
    """``InProcessGrid`` whose messages cross Flower's object transport, timed.

    Unlike the parent, a client that raises stops the benchmark: an error reply would
    make one side do less work than the other.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        clock: RoundClock,
        num_nodes: int,
        run_config: Mapping[str, Any],
    ) -> None:
        super().__init__(client_app, num_nodes=num_nodes, run_config=run_config)
        self.clock = clock

    def deliver(self, msg: Message, context: Context) -> Message:
        """Transmit ``msg``, run the client (train + encode), transmit its reply back."""
        with self.clock.phase("wire"):
            delivered, _ = transmit(msg)
        with self.clock.phase("client"):  # train + encode; train is timed inside
            reply = self.client_app(delivered, context)
        with self.clock.phase("wire"):
            reply, nbytes = transmit(reply)
        self.clock.uplink_bytes += nbytes
        return reply


@dataclass
class Federation:
    """One side of the comparison: its grid, strategy and global model."""

    name: str
    grid: TimedGrid
    strategy: Strategy
    arrays: ArrayRecord
    samples: list[dict[str, float]] = field(default_factory=list)

    def run_round(self, cfg: RunConfig, server_round: int) -> None:
        """One round as ``sims.app.server_app.run`` does it, minus evaluation and checkpoint."""
        clock = self.grid.clock
        clock.reset()
        with clock.phase("round"):
            random.seed(node_seed(cfg.run.seed, server_round))  # the same sampling on both sides
            with clock.phase("server"):
                messages = self.strategy.configure_train(
                    server_round, self.arrays, ConfigRecord({}), self.grid
                )
            replies = list(self.grid.send_and_receive(messages))
            with clock.phase("server"):
                arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        # Both sides must have used every client, or their work differs.
        accepted = metrics["accepted"] if metrics and "accepted" in metrics else len(replies)
        if arrays is None or len(replies) != cfg.run.num_supernodes or accepted != len(replies):
            raise RuntimeError(f"{self.name}, round {server_round}: not every reply was used")
        self.arrays = arrays
        s = clock.seconds
        if not s["wall-train"] > 0.0:
            raise RuntimeError(f"{self.name}: train_received was not timed (no longer called?)")
        sample = {"uplink": float(clock.uplink_bytes)}
        for c in CLOCKS:
            sample |= {f"{c}-{k}": s[f"{c}-{k}"] for k in ("train", "wire", "server", "round")}
            sample[f"{c}-encode"] = s[f"{c}-client"] - s[f"{c}-train"]
            sample[f"{c}-rest"] = s[f"{c}-round"] - s[f"{c}-train"]
        self.samples.append(sample)


def federations(cfg: RunConfig, clock: RoundClock) -> tuple[Federation, Federation]:
    """Fresh fedquant and stock federations: new node contexts, the same initial model."""

    def grid(reply: Reply) -> TimedGrid:
        return TimedGrid(
            timed_app(reply, clock),
            clock=clock,
            num_nodes=cfg.run.num_supernodes,
            run_config=cfg.to_flower(),
        )

    initial = build_model(cfg.train.model, seed=cfg.run.seed).state_dict()
    fedquant = Federation(
        "fedquant",
        grid(quantized_reply),
        strategy_from_config(cfg),
        ArrayRecord(initial),
    )
    stock = Federation(
        "stock",
        grid(float32_reply),
        FedAvg(
            fraction_train=cfg.run.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.run.min_train_nodes,
            min_available_nodes=cfg.run.num_supernodes,
        ),
        ArrayRecord(initial),
    )
    return fedquant, stock


def measure(cfg: RunConfig, *, repeats: int) -> tuple[Samples, Samples]:
    """Per-round samples of (fedquant, stock): ``repeats`` x ``num_server_rounds`` each.

    Each repeat starts both federations afresh (round 1 from the initial model, fresh
    node state, so a DP budget is never exhausted); rounds alternate which side goes
    first (taking turns over all rounds). One round of each side runs first, untimed,
    to warm caches and allocators.
    """
    clock = RoundClock()
    fq_samples: list[dict[str, float]] = []
    stock_samples: list[dict[str, float]] = []
    for fed in federations(cfg, clock):
        fed.run_round(cfg, 1)  # warm-up
    for repeat in range(repeats):
        fedquant, stock = federations(cfg, clock)
        for server_round in range(1, cfg.run.num_server_rounds + 1):
            first = (repeat * cfg.run.num_server_rounds + server_round) % 2
            for fed in (fedquant, stock) if first else (stock, fedquant):
                fed.run_round(cfg, server_round)
        fq_samples += fedquant.samples
        stock_samples += stock.samples
    return fq_samples, stock_samples


def _median(samples: Samples, key: str) -> float:
    return statistics.median(s[key] for s in samples)


def overhead(fq: Samples, stock: Samples, *, clock: str) -> dict[str, float]:
    """Overhead ratios (fedquant − stock) / stock from per-round medians of ``clock``.

    ``round`` counts training once for both sides (the median over all rounds of
    both): it is the same function on the same data, so a gap between the sides' train
    medians can only be machine noise, reported as ``train-gap``. ``round-raw`` is the
    plain ratio of the round medians, noise included.
    """

    def med(samples: Samples, key: str) -> float:
        return _median(samples, f"{clock}-{key}")

    train = statistics.median([s[f"{clock}-train"] for s in (*fq, *stock)])
    rest_fq, rest_stock = med(fq, "rest"), med(stock, "rest")
    return {
        "round": (rest_fq - rest_stock) / (train + rest_stock),
        "round-raw": (med(fq, "round") - med(stock, "round")) / med(stock, "round"),
        "rest": (rest_fq - rest_stock) / rest_stock,
        "train-gap": (med(fq, "train") - med(stock, "train")) / train,
        "uplink": _median(stock, "uplink") / _median(fq, "uplink"),
    }


def table_rows(label: str, fq: Samples, stock: Samples, *, bits: int, clock: str) -> list[str]:
    """Both paths' medians (ms of ``clock``, bytes), and fedquant minus stock."""

    def row(path: str, samples: Samples) -> str:
        cols = " | ".join(f"{1000 * _median(samples, f'{clock}-{k}'):.1f}" for k in COLUMNS)
        return f"| {label} | {path} | {cols} | {_median(samples, 'uplink'):,.0f} |"

    diff = " | ".join(
        f"{1000 * (_median(fq, f'{clock}-{k}') - _median(stock, f'{clock}-{k}')):+.1f}"
        for k in COLUMNS
    )
    ratio = _median(fq, "uplink") / _median(stock, "uplink")
    return [
        row("stock FedAvg, float32", stock),
        row(f"fedquant, {bits}-bit, error-weighted", fq),
        f"| {label} | fedquant − stock | {diff} | x{ratio:.3f} |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both federations, write bench.md and samples.json under ``--out``."""
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sims.bench.overhead", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=defaults.train.local_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.train.batch_size)
    parser.add_argument("--bits", type=int, default=defaults.codec.bits)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp", action="store_true", help="also measure with DP-SGD training")
    parser.add_argument(
        "--full-codec",
        action="store_true",
        help="also measure issue 13's codec in both directions: Hadamard rotation, dither,"
        " entropy coding, error feedback and a downlink at --bits",
    )
    parser.add_argument("--out", default="outputs/bench-overhead")
    args = parser.parse_args(argv)

    import logging

    torch.set_num_threads(1)  # receive sets it too; the server side runs here
    logging.getLogger("flwr").setLevel(logging.ERROR)  # e.g. FedAvg's fraction_evaluate=0 note
    base = {
        "num-supernodes": args.clients,
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "batch-size": args.batch_size,
        "bits": args.bits,
        "aggregator": "error-weighted",
        "seed": args.seed,
        "quant-policy": "none",  # the same full-precision training on both sides
        "dp": False,
        "out-dir": args.out,
    }
    configs = [("no DP", base)] + ([("DP-SGD", {**base, "dp": True})] if args.dp else [])
    if args.full_codec:
        full = {
            "rotation": "hadamard",
            "rounding": "dithered",
            "entropy-coding": True,
            "error-feedback": True,
            "downlink-bits": args.bits,
        }
        configs.append(("no DP, full codec", {**base, **full}))

    results = []
    for label, overrides in configs:
        cfg = RunConfig.from_flower(overrides, strict=True)
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        results.append((label, *measure(cfg, repeats=args.repeats)))

    header = [
        "| training | path | train | encode | wire | server | not training | round"
        " | uplink B/round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    report = [
        f"Per-round time, ms: median over {args.rounds} rounds x {args.repeats} repeats, the"
        f" two paths interleaved; {args.clients} clients in one process, {args.local_steps}"
        f" local steps of batch {args.batch_size}, 1 thread. Each column is its own median;"
        " 'not training' is round minus train.",
    ]
    for clock, title in (("wall", "Wall time"), ("cpu", "CPU time of this process")):
        report += ["", f"{title}:", "", *header]
        for label, fq, stock in results:
            report += table_rows(label, fq, stock, bits=args.bits, clock=clock)
    report.append("")
    for label, fq, stock in results:
        r, cpu = overhead(fq, stock, clock="wall"), overhead(fq, stock, clock="cpu")
        verdict = "met" if r["round"] < TARGET else "not met"
        report += [
            f"overhead ({label}): {100 * r['round']:.2f}%"
            f" (target < {100 * TARGET:.0f}%): {verdict}",
            f"  in CPU time: {100 * cpu['round']:.2f}%; whole round from raw medians:"
            f" {100 * r['round-raw']:+.2f}% (wall), {100 * cpu['round-raw']:+.2f}% (CPU),"
            f" with train medians {100 * r['train-gap']:+.2f}% / {100 * cpu['train-gap']:+.2f}%"
            " apart (noise: the same work);",
            f"  not-training part alone: {100 * r['rest']:+.1f}% (wall),"
            f" {100 * cpu['rest']:+.1f}% (CPU); uplink {r['uplink']:.1f}x smaller",
        ]
    write_report(report, args.out)
    # Every timed round, in seconds (uplink in bytes), for a closer look at the noise.
    raw = {label: {"fedquant": fq, "stock": stock} for label, fq, stock in results}
    (Path(args.out) / "samples.json").write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
