"""Throughput of quantize + pack against ``torch.quantize_per_tensor``, and of the rotation.

The reference row is what torch needs to do the same job from the same input: the scale
from max|x| (``torch.aminmax``) and ``torch.quantize_per_tensor`` to quint8 (8-bit codes,
no packing, no error). The fedquant rows time ``quantize`` (clip threshold, codes and
their MSE) followed by ``pack_codes``. MB/s counts float32 input bytes over the median
wall time; methods are interleaved within each repeat so that load drift hits all alike.

The second figure (``rotation_throughput``) times ``fedquant.rotation.rotate`` and
``unrotate`` next to 4-bit OCTAV/stochastic quantize + pack of the same tensor, in the
same run, over the best of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fedquant.codec import ClipRule, Rounding, quantize
from fedquant.packing import pack_codes
from fedquant.rotation import block_size, rotate, unrotate

__all__ = ["quantize_pack_throughput", "rotation_throughput"]

REFERENCE = "torch.quantize_per_tensor (quint8, scale from max abs)"
ROTATION_BASELINE = "quantize+pack 4-bit OCTAV/stochastic"


def _reference(x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        lo, hi = torch.aminmax(x)
        scale = max(-float(lo), float(hi)) / 127.5 or 1.0
        with warnings.catch_warnings():  # quantized dtypes are deprecated in torch 2.13
            warnings.simplefilter("ignore")
            return torch.quantize_per_tensor(x, scale, 128, torch.quint8)

    return run


def _fedquant(
    x: torch.Tensor, *, bits: int, clip: ClipRule, rounding: Rounding, seed: int
) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(seed)

    def run() -> object:
        q = quantize(x, bits=bits, clip=clip, rounding=rounding, generator=generator)
        return pack_codes(q.codes, bits=bits)

    return run


def quantize_pack_throughput(
    *, numel: int = 4_000_000, bits: int = 4, repeats: int = 5, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows ``{"method", "mb_per_s", "ratio_vs_torch"}``; the torch reference comes first.

    ``x ~ N(0, 1)`` float32 of ``numel`` elements drawn with ``seed``; each method runs
    once to warm up (this includes fedquant's numba compilation or cache load), then
    ``repeats`` times (interleaved); MB/s = 4 * numel / 1e6 over
    the median seconds; ``ratio_vs_torch`` = MB/s / reference MB/s.
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"`numel` must be an integer >= 1. Found `{numel!r}`.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an integer >= 1. Found `{repeats!r}`.")
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    methods: dict[str, Callable[[], object]] = {REFERENCE: _reference(x)}
    for clip in (ClipRule.MAX, ClipRule.OCTAV):
        for rounding in (Rounding.STOCHASTIC, Rounding.NEAREST):
            name = f"fedquant quantize+pack {bits}-bit {clip.name}/{rounding.value}"
            methods[name] = _fedquant(x, bits=bits, clip=clip, rounding=rounding, seed=seed)

    timings: dict[str, list[float]] = {name: [] for name in methods}
    for run in methods.values():
        run()  # warm-up (JIT compilation, thread pool, allocator, caches)
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    megabytes = 4 * numel / 1e6
    rates = {name: megabytes / statistics.median(times) for name, times in timings.items()}
    return [
        {"method": name, "mb_per_s": rate, "ratio_vs_torch": rate / rates[REFERENCE]}
        for name, rate in rates.items()
    ]


def rotation_throughput(
    *, numel: int = 1 << 20, repeats: int = 9, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows ``{"method", "mb_per_s", "ratio_vs_quantize_pack"}``, the baseline first.

    ``x ~ N(0, 1)`` float32 of ``numel`` elements drawn with ``seed``. Times 4-bit
    ``quantize`` (OCTAV, stochastic) + ``pack_codes`` of x, ``rotate(x)`` and
    ``unrotate`` of that rotation, interleaved, after one warm-up call each (numba
    compilation or cache load). MB/s = 4 * numel / 1e6 over the best of ``repeats``
    times: on a shared machine the fastest run is the one least slowed by other load.
    ``ratio_vs_quantize_pack`` = MB/s / baseline MB/s.
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
        raise ValueError(f"`numel` must be an integer >= 1. Found `{numel!r}`.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be an integer >= 1. Found `{repeats!r}`.")
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    flat = x.numpy()
    rotated = rotate(flat, seed)
    b = block_size(numel)
    methods: dict[str, Callable[[], object]] = {
        ROTATION_BASELINE: _fedquant(
            x, bits=4, clip=ClipRule.OCTAV, rounding=Rounding.STOCHASTIC, seed=seed
        ),
        f"rotate (block {b})": lambda: rotate(flat, seed),
        f"unrotate (block {b})": lambda: unrotate(rotated, numel, seed),
    }
    timings: dict[str, list[float]] = {name: [] for name in methods}
    for run in methods.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    megabytes = 4 * numel / 1e6
    rates = {name: megabytes / min(times) for name, times in timings.items()}
    return [
        {
            "method": name,
            "mb_per_s": rate,
            "ratio_vs_quantize_pack": rate / rates[ROTATION_BASELINE],
        }
        for name, rate in rates.items()
    ]


def format_table(
    rows: list[dict[str, Any]], *, ratio: str = "ratio_vs_torch", label: str = "vs torch"
) -> str:
    """Plain-text table of throughput rows: method, MB/s and the ``ratio`` column."""
    width = max(len("method"), *(len(row["method"]) for row in rows))
    col = len(label)
    lines = [f"{'method':<{width}}  {'MB/s':>9}  {label:>{col}}"]
    lines += [
        f"{row['method']:<{width}}  {row['mb_per_s']:>9.1f}  {row[ratio]:>{col}.2f}" for row in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=4_000_000)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rotation-numel", type=int, default=1 << 20, help="tensor size of the rotation figure"
    )
    parser.add_argument("--rotation-repeats", type=int, default=9, help="best of this many")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # also caps fedquant's worker threads
    rows = quantize_pack_throughput(
        numel=args.numel, bits=args.bits, repeats=args.repeats, seed=args.seed
    )
    print(f"numel={args.numel} bits={args.bits} threads={torch.get_num_threads()}")
    print(format_table(rows))
    rotation_rows = rotation_throughput(
        numel=args.rotation_numel, repeats=args.rotation_repeats, seed=args.seed
    )
    print(f"\nrotation: numel={args.rotation_numel}, best of {args.rotation_repeats}")
    print(format_table(rotation_rows, ratio="ratio_vs_quantize_pack", label="vs quantize+pack"))


if __name__ == "__main__":
    main()
