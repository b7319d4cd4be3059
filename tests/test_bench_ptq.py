"""The PTQ benchmark: its grid, resuming, its table, verdicts and cost estimate.

The sweep itself runs for ~51 minutes (``python -m sims.bench.ptq``); here its pieces
are checked on synthetic results, one cell on a saved model, and a tiny end-to-end
invocation with training.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedquant.config import RunConfig
from sims.bench.ptq import (
    BITS,
    FP,
    METHODS,
    MODELS,
    PRIVACY,
    MethodRow,
    PTQCell,
    TrainRun,
    budget_lines,
    cell_path,
    estimate_budget,
    estimate_cell,
    estimate_train,
    expected_pairs,
    finished_training,
    gap_verdicts,
    load_result,
    main,
    method_rows,
    ordering_verdicts,
    paired,
    parse_args,
    ptq_cells,
    run_all,
    run_ptq_cell,
    table,
    train_runs,
)
from sims.bench.sweep import CELL_CPU_SECONDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_grid_has_every_cell_the_issue_asks_for() -> None:
    args = parse_args([])
    runs = train_runs(args)
    assert {(r.model, r.privacy) for r in runs} == {(m, p) for m in MODELS for p in PRIVACY}
    for run in runs:
        cfg = RunConfig.from_flower(run.overrides("out"), strict=True)
        assert cfg.run.num_supernodes == 10 and cfg.train.partitioning.value == "iid"
        assert cfg.dp.enabled == (run.privacy == "eps8")
        assert not cfg.dp.enabled or cfg.dp.target_epsilon == 8.0
        assert not cfg.dpquant.active and cfg.ptq.method.value == "none"
    cells = ptq_cells(args, runs)
    assert len({cell_path("out", c) for c in cells}) == len(cells)  # no file holds two cells
    count = Counter((c.model, c.privacy, c.bits, c.method) for c in cells)
    for run in runs:
        assert count[run.model, run.privacy, FP, FP] == 1
        for bits in BITS:
            assert count[run.model, run.privacy, bits, "RTN"] == 1  # deterministic
            for method in set(METHODS) - {"RTN"}:
                assert count[run.model, run.privacy, bits, method] == 3  # 3 ptq-seeds
    for cell in cells:
        if cell.method != FP:
            ptq = RunConfig.from_flower(cell.overrides(), strict=True).ptq
            assert (ptq.weight_bits, ptq.act_bits) == BITS[cell.bits]
            assert ptq.seed == cell.seed and ptq.iterations == args.iterations
    mrecg = {c.method: c.overrides()["ptq-capacity"] for c in cells if "MRECG" in c.method}
    assert mrecg == {"MRECG data-free": "data-free", "MRECG data-dependent": "data-dependent"}


def test_quick_mode_keeps_explicit_flags_even_at_their_default() -> None:
    quick = parse_args(["--quick"])
    assert quick.iterations == 20 and quick.seeds == [0] and quick.out.endswith("-quick")
    assert parse_args(["--quick", "--iterations", "300"]).iterations == 300  # the default
    assert parse_args(["--quick", "--seeds", "0", "1"]).seeds == [0, 1]
    assert {r.rounds for r in train_runs(quick)} == {2}


def _row(model: str, bits: str, method: str, acc: list[float], privacy: str = "nodp") -> MethodRow:
    return MethodRow(model, privacy, bits, method, dict(enumerate(acc)), 1000, 125, 2.0)


def _setting(model: str, bits: str, accs: dict[str, list[float]]) -> list[MethodRow]:
    return [_row(model, bits, method, acc) for method, acc in accs.items()]


PAPER_SHAPE = {
    "RTN": [80.0],
    "AdaRound": [85.0, 86.0, 87.0],
    "BRECQ": [88.0, 88.0, 89.0],
    "MRECG data-free": [89.0, 90.0, 90.0],
    "MRECG data-dependent": [88.5, 88.0, 89.5],
}


def test_ordering_verdict_holds_when_the_means_follow_the_paper() -> None:
    (line,) = ordering_verdicts(_setting("cnn", "W2A4", PAPER_SHAPE))
    assert line.startswith("- cnn, no DP, W2A4: measured MRECG data-free 89.67 > ")
    assert line.endswith("holds (4 pairs)")


def test_ordering_verdict_names_each_pair_that_fails() -> None:
    accs = {**PAPER_SHAPE, "BRECQ": [84.0, 85.0, 86.0], "AdaRound": [86.0, 86.0, 87.0]}
    (line,) = ordering_verdicts(_setting("resnet", "W4A4", accs))
    assert "DOES NOT HOLD" in line
    # BRECQ - AdaRound per seed: -2, -1, -1: mean -1.33, SE sd(-2,-1,-1)/sqrt(3) = 0.33
    assert "BRECQ < AdaRound by 1.33 ± 0.33 (significant, > 2 SE, 3 paired seeds)" in line
    assert "MRECG data-free < BRECQ" not in line  # that pair holds
    assert "AdaRound < RTN" not in line
    # A reversal within the noise is still reported, and said to be within it.
    noisy = {**PAPER_SHAPE, "MRECG data-dependent": [90.0, 86.0, 88.0]}  # vs BRECQ: +2, -2, -1
    (line,) = ordering_verdicts(_setting("cnn", "W2A4", noisy))
    assert "MRECG data-dependent < BRECQ by 0.33 ± 1.20 (within 2 SE, 3 paired seeds)" in line
    # One seed: no standard error to speak of.
    single = {m: acc[:1] for m, acc in PAPER_SHAPE.items()} | {"BRECQ": [84.0]}
    (line,) = ordering_verdicts(_setting("cnn", "W2A4", single))
    assert "BRECQ < AdaRound by 1.00 ± 0.00 (1 paired seed, no SE)" in line


def test_the_expected_order_skips_methods_not_measured() -> None:
    assert expected_pairs(["RTN", "BRECQ"]) == [("BRECQ", "RTN")]
    assert expected_pairs(METHODS) == [
        ("MRECG data-free", "BRECQ"),
        ("MRECG data-dependent", "BRECQ"),
        ("BRECQ", "AdaRound"),
        ("AdaRound", "RTN"),
    ]
    assert expected_pairs(["MRECG data-dependent", "AdaRound"]) == [
        ("MRECG data-dependent", "AdaRound")
    ]
    assert expected_pairs(["BRECQ"]) == []


def test_a_deterministic_method_pairs_with_every_seed() -> None:
    rtn = _row("cnn", "W2A4", "RTN", [80.0])
    ada = _row("cnn", "W2A4", "AdaRound", [81.0, 79.0, 83.0])
    assert paired(ada, rtn) == pytest.approx((1.0, 2.0 / 3**0.5, 3))
    # Methods that draw at random pair only on common seeds.
    brecq = MethodRow("cnn", "nodp", "W2A4", "BRECQ", {1: 80.0, 5: 90.0})
    assert paired(brecq, ada) == pytest.approx((1.0, 0.0, 1))


def test_gap_verdicts_widest_at_two_bits_and_on_the_deeper_model() -> None:
    rows = []
    # MRECG - BRECQ on the CNN: 0.5, 1.0, 2.0 (widest at W2A4); on the ResNet 1, 3, 2.5.
    for model, gaps in (("cnn", (0.5, 1.0, 2.0)), ("resnet", (1.0, 3.0, 2.5))):
        for bits, gap in zip(BITS, gaps, strict=True):
            rows += [
                _row(model, bits, "BRECQ", [80.0]),
                _row(model, bits, "MRECG data-free", [80.0 + gap]),
            ]
    lines = [line for line in gap_verdicts(rows) if "MRECG data-free − BRECQ" in line]
    cnn = next(line for line in lines if ", cnn, no DP:" in line)
    resnet = next(line for line in lines if ", resnet, no DP:" in line)
    deeper = next(line for line in lines if "cnn vs resnet" in line)
    assert "W4A8 +0.50, W4A4 +1.00, W2A4 +2.00 points" in cnn and cnn.endswith(": yes")
    assert resnet.endswith("NO (widest at W4A4)")
    assert "W2A4 +2.00 vs +2.50" in deeper and deeper.endswith(": yes")
    rows = [r for r in rows if not (r.model == "resnet" and r.bits == "W4A8")]
    rows.append(_row("resnet", "W4A8", "BRECQ", [80.0]))
    rows.append(_row("resnet", "W4A8", "MRECG data-free", [80.2]))  # below the CNN's 0.5
    deeper = next(line for line in gap_verdicts(rows) if "cnn vs resnet" in line)
    assert deeper.endswith("NO (wider on resnet at 2 of 3)")


def _result(cell: PTQCell, accuracy: float, **times: float) -> dict[str, Any]:
    return {
        **cell.key(),
        "accuracy": accuracy,
        "unit-names": [],
        "unit-losses": [],
        "groups": [],
        "capacities": [],
        "fp-bytes": 400,
        "packed-bytes": 400 if cell.method == FP else 50,
        "ptq-seconds": 1.5,
        "ptq-cpu-seconds": times.get("ptq", 0.0),
        "eval-cpu-seconds": times.get("eval", 0.0),
        "cell-seconds": times.get("total", 0.0),
        CELL_CPU_SECONDS: times.get("total", 0.0),
    }


def _cell(method: str, bits: str = "W2A4", seed: int = 0, **kw: Any) -> PTQCell:
    fields: dict[str, Any] = {
        "model": "cnn",
        "privacy": "nodp",
        "trained": "cnn-run",
        "iterations": 20,
        "calibration_size": 64,
        "test_size": 1000,
    }
    fields.update(kw)
    return PTQCell(bits=FP if method == FP else bits, method=method, seed=seed, **fields)


def test_table_reports_drop_sizes_and_the_deterministic_runs() -> None:
    results = [
        _result(_cell(FP), 98.0),
        _result(_cell("RTN"), 90.0),
        *(_result(_cell("BRECQ", seed=s), a) for s, a in enumerate([95.0, 96.0, 97.0])),
    ]
    rows = method_rows(results)
    assert [r.method for r in rows] == [FP, "RTN", "BRECQ"]
    text = "\n".join(table(rows))
    assert "| cnn | no DP | FP | FP | 98.00 ± 0.00 | - | - | 400 | - |" in text
    assert "| RTN | 90.00 ± 0.00 | +8.00 | 1 (deterministic) | 400 → 50 (x8.0) | 1.5 |" in text
    assert "| BRECQ | 96.00 ± 1.00 | +2.00 | 3 | 400 → 50 (x8.0) |" in text


def test_estimate_uses_a_cells_own_record_or_scales_the_most_alike() -> None:
    rtn = _result(_cell("RTN"), 90.0, ptq=1.0, eval=0.5, total=2.0)
    brecq = _result(_cell("BRECQ"), 90.0, ptq=5.0, eval=0.5, total=6.0)
    records = [rtn, brecq]
    assert estimate_cell(_cell("BRECQ"), records) == 6.0  # its own record
    # Another seed and privacy: the same work.
    assert estimate_cell(_cell("BRECQ", seed=2, privacy="eps8"), records) == 6.0
    # 10x the iterations, 4x the calibration, 10x the test images: RTN's 1.0 x 4
    # + reconstruction 4.0 x 10 + evaluation 0.5 x 10 + loading 0.5.
    bigger = _cell("BRECQ", iterations=200, calibration_size=256, test_size=10_000)
    assert estimate_cell(bigger, records) == pytest.approx(4.0 + 40.0 + 5.0 + 0.5)
    # A record at the same iterations is preferred to one at other bits.
    same_iters = _result(_cell("BRECQ", bits="W4A8", iterations=200), 0.0, ptq=3.0, total=3.0)
    # (No RTN record at W4A8: all its 3.0 is reconstruction, at the same iterations.)
    assert estimate_cell(bigger, [*records, same_iters]) == pytest.approx(3.0)
    assert estimate_cell(_cell("AdaRound"), records) is None  # nothing to scale from


def test_estimate_train_and_budget() -> None:
    small = TrainRun("cnn", "nodp", 2, 5, 64, clients=10)
    big = TrainRun("cnn", "nodp", 10, 20, 256, clients=10)
    record = {**vars(small), CELL_CPU_SECONDS: 10.0}
    # The server's two evaluations of 10,000 images (1e-4 CPU-s each) are fixed; the
    # rest (8 s) scales with the examples (x80).
    assert estimate_train(big, [record], eval_per_image=1e-4) == pytest.approx(2.0 + 8.0 * 80)
    assert estimate_train(small, [record], eval_per_image=1e-4) == 10.0
    assert estimate_train(TrainRun("resnet", "nodp", 2, 5, 64), [record], 1e-4) is None
    cells = [_cell("RTN", trained=small.name), _cell("BRECQ", trained=small.name)]
    budget = estimate_budget(
        [small],
        cells,
        train=[record],
        results=[_result(cells[0], 0.0, total=30.0), _result(cells[1], 0.0, total=90.0)],
        jobs=2,
    )
    assert budget.exact_cells == 2 and budget.unknown_cells == 0
    # 130 CPU-s on 2 processes is 65 s, but the cells wait for their model: 10 + 120 / 2.
    assert budget.minutes == pytest.approx(70.0 / 60)
    assert "about 1 min on 2 processes; fits 60 min" in budget_lines(budget, label="x")[0]


def test_a_finished_cell_is_reused_and_a_changed_one_is_not(tmp_path: Path) -> None:
    cell = _cell("BRECQ")
    path = cell_path(tmp_path, cell)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_result(cell, 91.0)))
    reused = load_result(tmp_path, cell)
    assert reused is not None and reused["accuracy"] == 91.0
    other = _cell("BRECQ", trained="cnn-run", iterations=20, test_size=500)
    assert load_result(tmp_path, other) is None  # another file name
    stale = {**_result(cell, 91.0), "iterations": 10}  # same file, other settings
    path.write_text(json.dumps(stale))
    assert load_result(tmp_path, cell) is None
    path.write_text(json.dumps(_result(cell, 92.0)))
    # The model trained under the same config, its cell finished: nothing runs (no worker
    # process, no checkpoint needed).
    run = TrainRun("cnn", "nodp", 2, 5, 64)
    folder = tmp_path / "models" / run.name
    folder.mkdir(parents=True)
    config = {k: v for k, v in run.overrides(tmp_path).items() if k != "out-dir"}
    (folder / "results.json").write_text(json.dumps({"config": config, "summary": {"rounds": 2}}))
    assert finished_training(run, tmp_path)
    assert not finished_training(TrainRun("cnn", "nodp", 3, 5, 64), tmp_path)
    results, failures = run_all([run], [cell], jobs=1, out=tmp_path)
    assert [r["accuracy"] for r in results] == [92.0] and failures == []
    config["dp"] = True  # another experiment in that folder: not reused
    (folder / "results.json").write_text(json.dumps({"config": config, "summary": {"rounds": 2}}))
    assert not finished_training(run, tmp_path)


def test_one_cell_on_a_saved_model(tmp_path: Path) -> None:
    """A float cell and an RTN cell of a freshly built CNN: result files, sizes, losses."""
    from fedquant.config import ModelName
    from fedquant.models import build_model
    from sims.app.checkpoint import Checkpoint, save_checkpoint

    model = build_model(ModelName.CNN, seed=3)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "models" / "cnn-run", Checkpoint(1, arrays, {}, {}, {}))
    fp = run_ptq_cell((_cell(FP, test_size=200), str(tmp_path)))
    rtn = run_ptq_cell((_cell("RTN", calibration_size=32, test_size=200), str(tmp_path)))
    assert fp["packed-bytes"] == fp["fp-bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert rtn["fp-bytes"] == fp["fp-bytes"] and rtn["packed-bytes"] < fp["fp-bytes"] / 4
    assert rtn["unit-names"] == ["conv1", "conv2", "fc1", "fc2"]
    assert len(rtn["unit-losses"]) == 4 and rtn["groups"] == [[0], [1], [2], [3]]
    assert 0.0 <= rtn["accuracy"] <= 100.0
    saved = json.loads(cell_path(tmp_path, _cell(FP, test_size=200)).read_text())
    assert saved == fp


def test_a_tiny_sweep_end_to_end_and_resumed(tmp_path: Path) -> None:
    """Train a tiny CNN through the round loop, quantize it twice, report; then resume.

    12-18 s on 2 busy cores, most of it the server's two evaluations of 10,000 images.
    """
    argv = [
        "--quick",
        "--models",
        "cnn",
        "--privacy",
        "nodp",
        "--bits",
        "W2A4",
        "--methods",
        "RTN",
        "BRECQ",
        "--clients",
        "2",
        "--iterations",
        "5",
        "--calibration-size",
        "32",
        "--test-size",
        "200",
        "--jobs",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    report = (tmp_path / "bench.md").read_text()
    assert "| cnn | no DP | W2A4 | BRECQ |" in report
    verdict = next(line for line in report.splitlines() if line.startswith("- cnn, no DP, W2A4"))
    assert verdict.endswith("holds (1 pairs)") or "DOES NOT HOLD: BRECQ < RTN" in verdict
    assert "The default sweep, estimated from the times recorded under" in report
    assert (tmp_path / "ptq.png").read_bytes()[:4] == b"\x89PNG"
    files = sorted((tmp_path / "cells").glob("*/*.json"))
    assert len(files) == 3  # FP, RTN, BRECQ
    stamps = [f.stat().st_mtime_ns for f in files]
    checkpoint = next((tmp_path / "models").glob("*/checkpoint.npz"))
    trained = checkpoint.stat().st_mtime_ns
    time.sleep(0.01)
    assert main([*argv, "--collect"]) == 0
    assert main(argv) == 0  # everything reused: no cell, no training runs again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert checkpoint.stat().st_mtime_ns == trained
    assert (tmp_path / "bench.md").read_text().split("## Cost")[0] == report.split("## Cost")[0]


def test_a_failing_cell_is_reported_and_the_sweep_goes_on(tmp_path: Path) -> None:
    run = TrainRun("cnn", "nodp", 2, 5, 64)
    folder = tmp_path / "models" / run.name
    folder.mkdir(parents=True)
    config = {k: v for k, v in run.overrides(tmp_path).items() if k != "out-dir"}
    (folder / "results.json").write_text(json.dumps({"config": config, "summary": {"rounds": 2}}))
    done = _cell("RTN", trained=run.name)
    cell_path(tmp_path, done).parent.mkdir(parents=True)
    cell_path(tmp_path, done).write_text(json.dumps(_result(done, 90.0)))
    missing = _cell("BRECQ", trained=run.name)  # its model has no checkpoint
    results, failures = run_all([run], [done, missing], jobs=1, out=tmp_path)
    assert [r["method"] for r in results] == ["RTN"]
    assert len(failures) == 1 and "FileNotFoundError" in failures[0]
    assert missing.file_name in failures[0]
