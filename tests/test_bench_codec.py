"""The codec benchmarks: the rate-distortion table and the accuracy sweep's grid and report.

``python -m sims.bench.codec_rd`` trains real CNN updates and ``sims.bench.codec_accuracy``
runs ~150 federated runs; here their pieces are checked on synthetic inputs whose
answers are known: a uniform vector quantized on a grid of known step (vNMSE from
theory, bits per coordinate exactly B), and hand-made run results for the report.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedquant.config import ClipRule, Rounding, RunConfig
from fedquant.seeds import node_seed
from sims.bench.codec_accuracy import (
    DEFAULT_CODECS,
    DOWNLINK_BITS,
    FLOAT32,
    PRESETS,
    QUANTIZED,
    ROUND_BYTES,
    ROUND_FRACTION,
    UPLINK_BITS,
    calibration_cells,
    cells,
    downlink_of,
    issue_targets,
    link_stats,
    pareto_plot,
    parse_args,
    preset_of,
    table,
    targets,
    time_estimate,
    with_link_stats,
)
from sims.bench.codec_rd import (
    MODES,
    Mode,
    RDRow,
    measure,
    rd_rows,
    table_lines,
    verdict_lines,
    vnmse,
)
from sims.bench.codec_rd import parse_args as rd_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------- codec_rd

MAX_NEAREST = Mode("max, nearest", rounding=Rounding.NEAREST, clip=ClipRule.MAX)
MAX_STOCHASTIC = Mode("max, stochastic", clip=ClipRule.MAX)


def _uniform(count: int, seed: int = 0) -> torch.Tensor:
    """U[-1, 1] with both ends present, so that the MAX clip is exactly s = 1."""
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, count).astype(np.float32)
    x[:2] = (-1.0, 1.0)
    return torch.from_numpy(x)


def test_vnmse_sums_over_every_tensor() -> None:
    update = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[1.0], [2.0]])}
    decoded = {"a": np.array([3.0, 3.0]), "b": np.array([[1.0], [0.0]])}
    # errors 1 + 4 over norms 25 + 5
    assert vnmse(update, decoded) == pytest.approx(5.0 / 30.0)
    assert math.isnan(vnmse({"z": torch.zeros(3)}, {"z": np.zeros(3)}))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_nearest_rounding_of_a_uniform_vector_meets_theory(bits: int) -> None:
    # Grid step Δ = 2s/n, n = 2^B - 1, s = max|x| = 1; nearest rounding of values spread
    # uniformly over it errs by Δ²/12, and E x² = 1/3: vNMSE = 1/n².
    count = 1 << 16  # a multiple of 8: the packed codes are exactly B bits each
    sample = measure({"x": _uniform(count)}, MAX_NEAREST, bits=bits, seed=0)
    n = (1 << bits) - 1
    assert sample.vnmse == pytest.approx(1.0 / n**2, rel=0.03)
    assert sample.data_bits == bits
    # The serialized update adds the metadata and the record framing, under 1% here.
    assert bits < sample.reply_bits < bits * 1.01 + 0.01


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_doubles_the_error_of_nearest(bits: int) -> None:
    # Stochastic rounding of a uniform fraction f errs by E f(1 - f) Δ² = Δ²/6.
    sample = measure({"x": _uniform(1 << 16, seed=1)}, MAX_STOCHASTIC, bits=bits, seed=3)
    assert sample.vnmse == pytest.approx(2.0 / ((1 << bits) - 1) ** 2, rel=0.05)


def test_rd_rows_average_over_updates() -> None:
    updates = [{"x": _uniform(4096, seed=s), "y": _uniform(64, seed=s + 10)} for s in (0, 1)]
    (row,) = rd_rows(updates, [MAX_STOCHASTIC], [3], seed=7)
    samples = [
        measure(u, MAX_STOCHASTIC, bits=3, seed=node_seed(7, i)) for i, u in enumerate(updates)
    ]
    assert (row.mode, row.bits, row.updates) == ("max, stochastic", 3, 2)
    assert row.vnmse == pytest.approx(np.mean([s.vnmse for s in samples]))  # same draws
    assert row.vnmse_std == pytest.approx(np.std([s.vnmse for s in samples], ddof=1))
    # 4096 codes of 3 bits pack exactly; 64 codes too: 3 bits per coordinate.
    assert row.data_bits == 3
    assert row.ratio == pytest.approx(row.vnmse * 2**6)


def test_every_mode_decodes_what_it_encodes() -> None:
    update = {
        "w": torch.randn(40, 50, generator=torch.Generator().manual_seed(0)),
        "b": torch.randn(7),
    }
    for mode in MODES:
        sample = measure(update, mode, bits=4, seed=1)
        # A 4-bit grid of a Gaussian: well under 5% error whatever the mode (0.2 = a bug).
        assert sample.vnmse < 0.05, mode.name
        assert sample.data_bits <= 4 * 2.0  # a rotation pads by less than 2x


def _row(mode: str, bits: int, ratio: float, data_bits: float) -> RDRow:
    return RDRow(mode, bits, ratio / 4.0**bits, 0.0, data_bits, data_bits + 0.08, 1.0, 3)


def test_verdicts_count_only_modes_within_the_budget() -> None:
    rows = [
        _row("plain", 2, 3.0, 2.0),
        _row("good", 2, 1.5, 2.01),  # byte rounding: within 1%
        _row("padded", 2, 1.2, 2.2),  # better, but sends 10% more
        _row("plain", 4, 2.5, 4.0),
        _row("padded", 4, 2.2, 4.3),
    ]
    two, four = verdict_lines(rows, label="SGD")
    assert two.startswith("- SGD: B = 2: best mode within 2 bits/coord is good")
    assert "1.50 x 2^-4" in two and ": met" in two
    assert "padded does better (1.20x) but sends 2.200 bits/coord" in two
    assert "best mode within 4 bits/coord is plain" in four and "NOT met" in four
    only_over = verdict_lines([_row("padded", 2, 1.0, 2.5)])
    assert "no mode sends <= 2 bits per coordinate: NOT met" in only_over[0]
    assert verdict_lines([_row("plain", 8, 1.0, 8.0)]) == []  # not a target


def test_table_has_a_row_per_mode_and_bits() -> None:
    lines = table_lines([_row("plain", 2, 3.0, 2.0), _row("plain", 4, 2.5, 4.0)])
    assert len(lines) == 4
    assert lines[2] == "| plain | 2 | 0.1875 | 3.00 | 2.000 | 2.080 | 1.0 |"


def test_rd_quick_mode_keeps_explicit_flags() -> None:
    quick = rd_args(["--quick"])
    assert (quick.clients, quick.rounds, quick.keep, quick.dp_epsilon) == (2, 2, [1, 2], 0.0)
    assert rd_args(["--quick", "--dp-epsilon", "4"]).dp_epsilon == 4.0
    assert rd_args([]).dp_epsilon == 8.0
    with pytest.raises(SystemExit):
        rd_args(["--rounds", "2", "--keep", "3"])


# ----------------------------------------------------------------------------- codec_accuracy


def test_default_grid_crosses_presets_downlinks_bits_and_seeds() -> None:
    args = parse_args([])
    grid = cells(args)
    names = [c["out-dir"] for c in grid]
    assert len(names) == len(set(names))  # no cell runs twice
    for cell in grid:
        overrides = {k: v for k, v in cell.items() if k != "out-dir"}
        RunConfig.from_flower(overrides, strict=True)  # every cell is a valid run config
    quantized = Counter(
        (c["partitioning"], c["bits"], preset_of(c), downlink_of(c))
        for c in grid
        if c["bits"] != 32
    )
    assert set(DEFAULT_CODECS) <= set(PRESETS)
    for part in ("iid", "dirichlet"):
        for bits in (1, 2, 4):
            for codec in DEFAULT_CODECS:
                for downlink in (FLOAT32, QUANTIZED):
                    assert quantized[part, bits, codec, downlink] == 3  # 3 seeds
    assert sum(quantized.values()) == 2 * 3 * len(DEFAULT_CODECS) * 2 * 3
    reference = [c for c in grid if c["bits"] == 32]
    assert Counter((c["partitioning"], c["aggregator"]) for c in reference) == {
        (p, a): 3 for p in ("iid", "dirichlet") for a in ("error-weighted", "fedavg")
    }
    assert all(c["downlink-bits"] == 32 and preset_of(c) == FLOAT32 for c in reference)
    assert {c["downlink-bits"] for c in grid if downlink_of(c) == QUANTIZED} == {1, 2, 4}
    assert {c["aggregator"] for c in grid if c["bits"] != 32} == {"error-weighted"}


def test_presets_are_what_their_names_say() -> None:
    ef = PRESETS["rotated-dithered-ans-ef"].settings
    assert ef == {
        "rounding": "dithered",
        "rotation": "hadamard",
        "unbiased-scale": False,
        "entropy-coding": True,
        "error-feedback": True,
    }
    assert PRESETS["baseline"].settings["rounding"] == "stochastic"
    assert {k: v for k, v in ef.items() if k != "error-feedback"} == {
        k: v for k, v in PRESETS["rotated-dithered-ans"].settings.items() if k != "error-feedback"
    }
    # Each preset is recognised from its run config, so collected runs are tabulated.
    for name, preset in PRESETS.items():
        assert preset_of({"bits": 2, **preset.settings}) == name
    assert (
        preset_of({"bits": 2, **PRESETS["baseline"].settings, "rotation": "hadamard"}) == "custom"
    )


def test_quick_grid_is_small_and_keeps_explicit_flags() -> None:
    quick = parse_args(["--quick"])
    grid = cells(quick)
    assert len(grid) <= 24  # 2 bits x 5 presets x 2 downlinks + the float32 references
    assert {c["partitioning"] for c in grid} == {"iid"} and {c["seed"] for c in grid} == {0}
    assert quick.rounds >= 2  # a round after the first, for the steady-state means
    assert parse_args(["--quick", "--seeds", "0", "1"]).seeds == [0, 1]
    assert parse_args(["--quick", "--out", "x"]).out == "x"


def _round(up: float, down: float, up_bytes: int, down_bytes: int) -> dict[str, Any]:
    return {
        UPLINK_BITS: up,
        DOWNLINK_BITS: down,
        "uplink-bytes": up_bytes,
        "downlink-bytes": down_bytes,
        "uplink-float32-bytes": 1000,
        "downlink-float32-bytes": 1000,
    }


def test_link_stats_average_the_rounds_after_the_first() -> None:
    rounds = [_round(4.1, 32.0, 130, 1000), _round(4.2, 4.0, 130, 120), _round(4.0, 4.2, 110, 140)]
    stats = link_stats(rounds)
    assert stats[UPLINK_BITS] == pytest.approx(4.1)
    assert stats[DOWNLINK_BITS] == pytest.approx(4.1)
    assert stats[ROUND_BYTES] == pytest.approx(250.0)
    assert stats[ROUND_FRACTION] == pytest.approx(500 / 4000)
    one = link_stats(rounds[:1])  # a one-round run: that round
    assert one[DOWNLINK_BITS] == 32.0 and one[ROUND_FRACTION] == pytest.approx(1130 / 2000)
    assert link_stats([])[UPLINK_BITS] is None


def test_with_link_stats_reads_each_runs_rounds(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    rounds = [_round(1.1, 32.0, 40, 1000), _round(1.1, 1.1, 40, 40)]
    (run / "results.json").write_text(json.dumps({"rounds": rounds}))
    (row,) = with_link_stats([{"out-dir": str(run), "final-accuracy": 0.9}])
    assert row[UPLINK_BITS] == pytest.approx(1.1) and row[ROUND_FRACTION] == pytest.approx(0.04)
    (missing,) = with_link_stats([{"out-dir": str(tmp_path / "none")}])
    assert missing[UPLINK_BITS] is None


def _result(
    part: str,
    bits: int,
    codec: str,
    downlink: str,
    acc: float,
    seed: int,
    *,
    aggregator: str = "error-weighted",
    fraction: float = 0.5,
) -> dict[str, Any]:
    settings = PRESETS["baseline" if codec == FLOAT32 else codec].settings
    return {
        "partitioning": part,
        "bits": bits,
        "aggregator": aggregator,
        **settings,
        "downlink-bits": 32 if downlink == FLOAT32 else bits,
        "seed": seed,
        "final-accuracy": acc,
        UPLINK_BITS: bits * 1.03,
        DOWNLINK_BITS: 32.0 if downlink == FLOAT32 else bits * 1.03,
        ROUND_FRACTION: fraction,
        ROUND_BYTES: 1e6 * fraction,
        "num-server-rounds": 8,
        "num-supernodes": 10,
        "local-steps": 20,
        "cell-seconds": 80.0,
    }


def _results() -> list[dict[str, Any]]:
    out = []
    for seed, delta in enumerate((-0.002, 0.0, 0.002)):
        out += [
            _result(
                "iid", 32, FLOAT32, FLOAT32, 0.970 + delta, seed, aggregator="fedavg", fraction=1.0
            ),
            _result("iid", 1, "baseline", FLOAT32, 0.950 + delta, seed, fraction=0.52),
            _result(
                "iid", 1, "rotated-dithered-ans-ef", QUANTIZED, 0.967 + delta, seed, fraction=0.034
            ),
            _result("iid", 4, "baseline", FLOAT32, 0.968 + delta, seed, fraction=0.56),
            _result(
                "iid", 4, "rotated-dithered-ans", QUANTIZED, 0.969 + delta, seed, fraction=0.13
            ),
            _result("iid", 2, "baseline", FLOAT32, 0.960 + delta, seed, fraction=0.53),
        ]
    return out


def test_table_rows_are_mean_and_std_over_seeds() -> None:
    lines = table(_results(), "iid", [1, 4, 32])
    assert lines[0] == (
        "| iid | bits | codec | downlink | error-weighted | fedavg | uplink bits/coord"
        " | downlink bits/coord | round bytes / float32 |"
    )
    assert "| | 1 | baseline | float32 | 95.00 ± 0.20 | - | 1.030 | 32.000 | 0.5200 |" in lines
    assert (
        "| | 1 | rotated-dithered-ans-ef | quantized | 96.70 ± 0.20 | - | 1.030 | 1.030 | 0.0340 |"
        in lines
    )
    assert "| | 32 | float32 | float32 | - | 97.00 ± 0.20 | 32.960 | 32.000 | 1.0000 |" in lines
    assert len(lines) == 2 + 5  # cells without runs are left out
    assert table(_results(), "dirichlet", [1])[2:] == []


def test_paper_b_targets_use_the_baseline_codec() -> None:
    four, two = targets(_results(), "iid")
    assert "4-bit error-weighted (stochastic) 96.80 vs 32-bit FedAvg 97.00: gap +0.20" in four
    assert four.endswith(": met")
    assert "gap +1.00 points (target <= 3): met" in two


def test_issue_targets_report_every_cell_and_the_best() -> None:
    lines = issue_targets(_results())
    text = "\n".join(lines)
    assert (
        "iid, 1 bit, baseline, float32 downlink: 95.00 vs float32 FedAvg 97.00: gap +2.00" in text
    )
    assert "iid, 1 bit, rotated-dithered-ans-ef, quantized downlink: 96.70" in text
    assert "best gap +0.30: met" in text
    assert "iid, 4 bits, baseline, float32 downlink: round bytes 0.5600 of float32" in text
    assert (
        "iid: round bytes (both directions) <= 0.15 of float32 at 4 bits: best 0.1300: met" in text
    )
    worse = [r for r in _results() if r["bits"] != 4 or r["downlink-bits"] == 32]
    worse = [
        {**r, "final-accuracy": r["final-accuracy"] - 0.01} if r["bits"] == 1 else r for r in worse
    ]
    text = "\n".join(issue_targets(worse))
    assert "best gap +1.30: NOT met" in text and "best 0.5600: NOT met" in text


def test_pareto_plot_is_written(tmp_path: Path) -> None:
    path = pareto_plot(_results(), tmp_path / "pareto.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_estimate_scales_the_measured_seconds_per_local_step() -> None:
    small = {"cell-seconds": 10.0, "local-steps": 5, "num-supernodes": 4, "num-server-rounds": 3}
    timed = [{**r, **small} for r in _results()[:2]]  # 20 s for 2 x 60 local steps
    grid = cells(parse_args([]))
    steps = sum(c["num-server-rounds"] * c["num-supernodes"] * c["local-steps"] for c in grid)
    assert time_estimate(timed, grid, jobs=2) == pytest.approx(20.0 / 120 * steps / 60 / 2)
    untimed = [{k: v for k, v in r.items() if k != "cell-seconds"} for r in timed]
    assert time_estimate(untimed, grid, jobs=2) is None
    # Two sizes: a + b x steps through 60 steps in 10 s and 1,600 steps (the default
    # cell) in 87 s: b = 0.05 s, a = 7 s.
    full = _results()[:1]  # 8 rounds x 10 clients x 20 steps, 80 s
    fitted = [*timed, {**full[0], "cell-seconds": 87.0}]
    expected = (7.0 * len(grid) + 0.05 * steps) / 60 / 2
    assert time_estimate(fitted, grid, jobs=2) == pytest.approx(expected)


def test_quick_mode_calibrates_on_one_default_size_cell() -> None:
    quick = parse_args(["--quick"])
    assert quick.calibrate and not parse_args([]).calibrate
    assert not parse_args(["--quick", "--no-calibrate"]).calibrate
    (cell,) = calibration_cells(quick)
    default = parse_args([])
    assert (cell["num-server-rounds"], cell["num-supernodes"], cell["local-steps"]) == (
        default.rounds,
        default.clients,
        default.local_steps,
    )
    assert Path(cell["out-dir"]).parent.parent == Path(quick.out) / "calibration"
    assert cell["out-dir"] not in {c["out-dir"] for c in cells(quick)}
    assert calibration_cells(default) == []
