"""Scale benchmark: many simulated clients on one machine, through the real launcher.

    python -m sims.bench.scale                      # 100 and 1,000 clients, 10% per round
    python -m sims.bench.scale --clients 1000 --rounds 5 --dp
    python -m sims.bench.scale --ray-address 10.0.0.1:6379   # on a running Ray cluster

For each client count it starts the launcher's own simulation SuperLink
(``sims.launch.run.simulation_superlink``), submits the app with ``submit_simulation`` and,
while the run lasts, samples every process of the SuperLink's tree (the SuperLink,
``flwr-simulation``, and the local Ray it starts: GCS, raylet, agents, client-actor
workers) from ``/proc``: the sum of RSS (which counts a page shared by N processes N
times: torch's libraries, the memory-mapped MNIST codes) and the sum of PSS (each
shared page divided among its users: the memory the run really occupies). Round
completions are timed from ``results.json``, which the ServerApp rewrites after each
round. Prints one markdown table. Attached to a cluster (``--ray-address``), the Ray
processes are not in the SuperLink's tree and the memory columns cover only the
SuperLink and ``flwr-simulation``.

Rounds per second is measured between the end of round 1 and the end of the last
round, so it leaves out Ray's start and the actors' first imports; "first round s"
is the time from submission to the end of round 1. Central evaluation runs only
after the last round (``eval-every`` = rounds), so the figures are about training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sims.launch.procs import process_tree
from sims.launch.run import resolve_run_config, simulation_superlink, submit_simulation


@dataclass
class Sample:
    """Memory of a process tree at one moment: sums over its processes, in KiB."""

    rss_kb: int
    pss_kb: int
    processes: int


@dataclass
class Trace:
    """Peak memory of the process tree and the time each round finished."""

    peak: Sample = field(default_factory=lambda: Sample(0, 0, 0))
    round_done_s: dict[int, float] = field(default_factory=dict)


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/PID/smaps_rollup; (0, 0) if gone."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def sample_tree(root: int) -> Sample:
    """Sum of RSS and of PSS over ``root``'s process tree now, and its process count."""
    pids = process_tree(root)
    rss = pss = 0
    for pid in pids:
        r, p = _memory_kb(pid)
        rss, pss = rss + r, pss + p
    return Sample(rss, pss, len(pids))


@contextlib.contextmanager
def watch(root: int, results: Path, *, every_s: float = 0.5) -> Iterator[Trace]:
    """Sample the tree's memory and the rounds finished, until the block ends."""
    trace, stop, start = Trace(), threading.Event(), time.monotonic()

    def loop() -> None:
        while not stop.wait(every_s):
            s, peak = sample_tree(root), trace.peak
            trace.peak = Sample(
                max(s.rss_kb, peak.rss_kb),
                max(s.pss_kb, peak.pss_kb),
                max(s.processes, peak.processes),
            )
            with contextlib.suppress(OSError, ValueError, KeyError):
                for row in json.loads(results.read_text())["rounds"]:
                    trace.round_done_s.setdefault(int(row["round"]), time.monotonic() - start)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield trace
    finally:
        stop.set()
        thread.join()


@dataclass
class Result:
    """One client count's run: status, timings and peak memory of its process tree."""

    clients: int
    sampled: int
    rounds: int
    status: str
    wall_s: float
    first_round_s: float
    rounds_per_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    processes: int


def bench(
    clients: int,
    *,
    rounds: int,
    fraction: float,
    local_steps: int,
    dp: bool,
    ray_address: str | None,
    client_cpus: int,
) -> Result:
    """Run ``clients`` simulated clients through the launcher's SuperLink, watched.

    The keywords are ``main``'s options of the same names.
    """
    with tempfile.TemporaryDirectory(prefix="fedquant-bench-") as tmp:
        out = Path(tmp) / "out"
        privacy = 'dp=true quant-policy="dpquant"' if dp else 'dp=false quant-policy="none"'
        overrides = [
            f"num-supernodes={clients} fraction-train={fraction} num-server-rounds={rounds}",
            f"local-steps={local_steps} eval-every={rounds} batch-size=32",
            privacy,
            f'out-dir="{out}"',
        ]
        cfg, parsed = resolve_run_config(overrides)
        start = time.monotonic()
        with simulation_superlink(Path(tmp), ray_address=ray_address) as link:
            with watch(link.process.pid, out / "results.json") as trace:
                status = submit_simulation(
                    link,
                    parsed,
                    num_supernodes=cfg.run.num_supernodes,
                    client_cpus=client_cpus,
                    stream=False,
                )
        wall = time.monotonic() - start
        # The last round may land between two samples: read the final file once more.
        with contextlib.suppress(OSError, ValueError, KeyError):
            for row in json.loads((out / "results.json").read_text())["rounds"]:
                trace.round_done_s.setdefault(int(row["round"]), wall)
    done = trace.round_done_s
    first = done.get(1, float("nan"))
    last = max(done) if done else 0
    rate = (last - 1) / (done[last] - first) if last > 1 and done[last] > first else float("nan")
    return Result(
        clients=clients,
        sampled=max(1, round(fraction * clients)),
        rounds=len(done),
        status=str(status.get("status")),
        wall_s=wall,
        first_round_s=first,
        rounds_per_s=rate,
        peak_rss_mib=trace.peak.rss_kb / 1024,
        peak_pss_mib=trace.peak.pss_kb / 1024,
        processes=trace.peak.processes,
    )


def table(results: Sequence[Result]) -> str:
    """The results as one markdown table."""
    lines = [
        "| clients | sampled/round | rounds | status | wall s | first round s | rounds/s "
        "(after round 1) | peak sum RSS MiB | peak sum PSS MiB | most processes |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.clients:,} | {r.sampled} | {r.rounds} | {r.status} | {r.wall_s:.1f} | "
            f"{r.first_round_s:.1f} | {r.rounds_per_s:.3f} | {r.peak_rss_mib:,.0f} | "
            f"{r.peak_pss_mib:,.0f} | {r.processes} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for each client count; 0 if every run completed."""
    parser = argparse.ArgumentParser(
        prog="python -m sims.bench.scale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction-train (default 0.1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--dp", action="store_true", help="DP-SGD and DPQuant on (default off)")
    parser.add_argument("--ray-address", default=None, help="attach to this Ray cluster")
    parser.add_argument("--client-cpus", type=int, default=1)
    args = parser.parse_args(argv)
    results = []
    for n in args.clients:
        r = bench(
            n,
            rounds=args.rounds,
            fraction=args.fraction,
            local_steps=args.local_steps,
            dp=args.dp,
            ray_address=args.ray_address,
            client_cpus=args.client_cpus,
        )
        results.append(r)
        print(table([r]).splitlines()[-1], flush=True)
    print(
        f"\nlocal-steps={args.local_steps} batch-size=32 dp={'on' if args.dp else 'off'} "
        f"fraction-train={args.fraction} client-cpus={args.client_cpus}"
        f"{' ray ' + args.ray_address if args.ray_address else ' local Ray'}\n"
    )
    print(table(results))
    return 0 if all(r.status == "finished:completed" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
