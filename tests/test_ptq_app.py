"""Post-training quantization in the ServerApp (after the last round) and from the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import sims.ptq
from fedquant.config import PTQMethod, PTQSettings, RunConfig
from fedquant.data import load_mnist
from fedquant.models import build_model, evaluate
from fedquant.ptq import PTQResult, load_quantized, quantize_model
from sims.app.checkpoint import CHECKPOINT_FILE, load_checkpoint
from sims.app.report import RunReport, plot_ptq_units, ptq_failure, ptq_section, ptq_summary
from sims.launch.inprocess import run_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 clients, 1 round of 10 non-private SGD steps: a model worth quantizing, in seconds.
TINY = {
    "num-supernodes": 2,
    "num-server-rounds": 1,
    "dp": False,
    "quant-policy": "none",
    "local-steps": 10,
    "batch-size": 32,
}
RUNS = {
    "rtn": {"ptq": "rtn"},
    "brecq": {"ptq": "brecq", "ptq-iterations": 20, "ptq-calibration-size": 64},
}


def _strict(text: str) -> dict[str, Any]:
    """results.json parsed strictly: NaN or Infinity tokens are an error."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    out: dict[str, Any] = json.loads(text, parse_constant=refuse)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunConfig]:
    """The finished runs of :data:`RUNS`, each in its own out-dir."""
    out = {}
    for name, keys in RUNS.items():
        out_dir = tmp_path_factory.mktemp(f"run-{name}")
        cfg = RunConfig.from_flower({**TINY, **keys, "out-dir": str(out_dir)}, strict=True)
        run_in_process(cfg)
        out[name] = cfg
    return out


def _results(cfg: RunConfig) -> dict[str, Any]:
    return _strict(Path(cfg.run.out_dir, "results.json").read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_server_app_records_the_quantized_final_model(
    runs: dict[str, RunConfig], name: str
) -> None:
    cfg = runs[name]
    results = _results(cfg)
    assert len(results["rounds"]) == 1  # the training results are all there
    ptq = results["ptq"]
    assert ptq["error"] is None
    assert (ptq["method"], ptq["weight-bits"], ptq["act-bits"]) == (name, 4, 8)
    assert ptq["calibration"] == "validation"
    assert ptq["calibration-size"] == cfg.ptq.calibration_size
    # The float model PTQ starts from is the final global model the last round evaluated.
    assert ptq["accuracy-fp"] == results["rounds"][-1]["accuracy"]
    for key in ("accuracy-fp", "accuracy-quantized"):
        assert math.isfinite(ptq[key]) and 0.0 <= ptq[key] <= 1.0, key
    assert ptq["drop"] == pytest.approx(ptq["accuracy-fp"] - ptq["accuracy-quantized"])
    assert 0 < ptq["packed-bytes"] < ptq["fp-bytes"]
    assert ptq["compression"] == pytest.approx(ptq["fp-bytes"] / ptq["packed-bytes"])
    assert ptq["seconds"] >= 0.0
    units = len(ptq["unit-names"])
    assert units >= 1 and len(ptq["unit-losses"]) == units
    assert sorted(i for group in ptq["groups"] for i in group) == list(range(units))
    out = Path(cfg.run.out_dir)
    assert (out / ptq["file"]).stat().st_size == ptq["file-bytes"] == ptq["packed-bytes"]
    assert ptq["plot"] == sims.ptq.PLOT_FILE
    assert (out / ptq["plot"]).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_the_packed_model_reloads_as_the_model_quantized_again(
    runs: dict[str, RunConfig], name: str
) -> None:
    cfg = runs[name]
    ptq = _results(cfg)["ptq"]
    loaded = load_quantized(Path(cfg.run.out_dir, ptq["file"]))
    test = load_mnist().test
    assert evaluate(loaded, test)[1] == ptq["accuracy-quantized"]

    checkpoint = load_checkpoint(cfg.run.out_dir)
    assert checkpoint is not None
    model = build_model(cfg.train.model, seed=1)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()})
    again = quantize_model(
        model, cfg.ptq, calibration=sims.ptq.calibration_images(cfg.ptq)
    ).model.eval()
    images = test.images[:256]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), again(images))  # bit-identical


def test_a_failed_quantization_keeps_the_training_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("reconstruction diverged")

    monkeypatch.setattr(sims.ptq, "quantize_model", broken)
    cfg = RunConfig.from_flower({**TINY, **RUNS["rtn"], "out-dir": str(tmp_path)}, strict=True)
    with caplog.at_level(logging.INFO, logger="flwr"):
        report = run_in_process(cfg)  # does not raise
    results = _results(cfg)
    assert [r["round"] for r in results["rounds"]] == [1]
    assert results["rounds"][0]["accuracy"] is not None
    assert results["ptq"]["error"] == "RuntimeError: reconstruction diverged"
    assert results["ptq"]["method"] == "rtn"
    assert report.ptq == results["ptq"]
    assert (tmp_path / CHECKPOINT_FILE).exists()
    assert not (tmp_path / sims.ptq.MODEL_FILE).exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "(ptq = 'rtn') failed" in errors[0]
    assert "RuntimeError: reconstruction diverged" in errors[0]  # with its traceback
    summary = [r.getMessage() for r in caplog.records if "summary:" in r.getMessage()]
    assert len(summary) == 1 and "ptq rtn W4A8: FAILED (RuntimeError" in summary[0]


def test_results_json_has_a_ptq_section_only_when_asked_and_stays_strict(
    tmp_path: Path,
) -> None:
    report = RunReport(tmp_path, {})
    report.write()
    assert "ptq" not in _strict((tmp_path / "results.json").read_text())

    # A diverged reconstruction: non-finite losses become null, the plot skips them.
    settings = PTQSettings(method=PTQMethod.BRECQ)
    result = PTQResult(
        model=torch.nn.Identity(),
        unit_names=["a", "b", "c", "d"],
        unit_losses=[math.nan, 1e-3, math.inf, 0.0],
        groups=[[0], [1], [2], [3]],
        capacities=[],
        fp_bytes=400,
        packed_bytes=50,
        seconds=1.0,
    )
    section = ptq_section(
        settings, result, accuracy_fp=0.9, accuracy_quantized=0.8, file="m.fqz", file_bytes=50
    )
    report.ptq = section
    report.write()
    written = _strict((tmp_path / "results.json").read_text())["ptq"]
    assert written["unit-losses"] == [None, 1e-3, None, 0.0]
    assert (written["compression"], written["drop"]) == (8.0, pytest.approx(0.1))
    plot = plot_ptq_units(tmp_path / "p.png", [section, ptq_failure(settings, ValueError("x"))])
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert ptq_summary(section).startswith(
        "ptq brecq W4A8 (512 validation images): test accuracy 0.9000 float -> 0.8000 quantized"
    )


# The command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--method", "mrecg", "--weight-bits", "9"], "run config key 'ptq-weight-bits' = 9"),
        (["--method", "gptq"], "run config key 'ptq' = 'gptq': must be one of"),
        (["--method", "rtn", "--qdrop", "0"], "run config key 'ptq-qdrop' = 0.0"),
        (["--method", "rtn", "--capacity", "huge"], "run config key 'ptq-capacity' = 'huge'"),
        (["--method", "brecq", "--calibration", "none"], "run config key 'ptq' = 'brecq'"),
        (["--method", "rtn", "--calibration", "none"], "run config key 'ptq-act-bits' = 8"),
        (["--method", "none"], "run config key 'ptq' = 'none': nothing to quantize"),
        (
            ["--method", "rtn", "--calibration", "none", "--act-bits", "32", "--compare", "brecq"],
            "--compare brecq: run config key 'ptq' = 'brecq'",
        ),
    ],
)
def test_cli_refuses_a_bad_setting_before_reading_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], named: str
) -> None:
    missing = tmp_path / "nowhere" / CHECKPOINT_FILE  # never read: the settings fail first
    assert sims.ptq.main(["--checkpoint", str(missing), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err


def test_cli_refuses_an_unknown_option_or_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sims.ptq.main(["--checkpoint", str(tmp_path), "--method", "rtn", "--bits", "4"])
    assert exit_info.value.code == 2
    assert "--bits" in capsys.readouterr().err
    assert sims.ptq.main(["--checkpoint", str(tmp_path), "--method", "rtn"]) == 2
    assert f"no {CHECKPOINT_FILE} there" in capsys.readouterr().err
    other = tmp_path / "model.npz"
    other.write_bytes(b"")
    assert sims.ptq.main(["--checkpoint", str(other), "--method", "rtn"]) == 2
    assert f"give a run's {CHECKPOINT_FILE} or its folder" in capsys.readouterr().err


def test_cli_quantizes_a_finished_run_as_the_server_app_did(
    runs: dict[str, RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = runs["rtn"]
    checkpoint = Path(cfg.run.out_dir, CHECKPOINT_FILE)
    assert (
        sims.ptq.main(["--checkpoint", str(checkpoint), "--method", "rtn", "--out", str(tmp_path)])
        == 0
    )
    written = _strict((tmp_path / "ptq-rtn.json").read_text())
    server = _results(cfg)["ptq"]
    assert written["server-round"] == 1 and written["model"] == "cnn"
    assert written["compare"] is None
    assert written["settings"]["ptq"] == "rtn"
    for key in ("accuracy-fp", "accuracy-quantized", "packed-bytes", "unit-names", "groups"):
        assert written["ptq"][key] == server[key], key
    assert (tmp_path / "model-ptq-rtn.fqz").exists()
    assert (tmp_path / "ptq-rtn-unit-loss.png").exists()
    out = capsys.readouterr().out
    assert out.startswith("ptq rtn W4A8 (512 validation images): test accuracy")


def test_cli_compares_two_methods_in_one_plot(
    runs: dict[str, RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = runs["rtn"].run.out_dir  # the folder works as well as the file
    options = ["--iterations", "10", "--calibration-size", "64", "--out", str(tmp_path)]
    assert (
        sims.ptq.main(
            ["--checkpoint", run_dir, "--method", "mrecg", "--compare", "brecq", *options]
        )
        == 0
    )
    written = _strict((tmp_path / "ptq-mrecg.json").read_text())
    mrecg, brecq = written["ptq"], written["compare"]
    assert (mrecg["method"], brecq["method"]) == ("mrecg", "brecq")
    assert mrecg["unit-names"] == brecq["unit-names"]
    assert mrecg["accuracy-fp"] == brecq["accuracy-fp"]
    assert (tmp_path / "model-ptq-mrecg.fqz").exists() and (
        tmp_path / "model-ptq-brecq.fqz"
    ).exists()
    assert (tmp_path / written["plot"]).exists() and written["plot"] == "ptq-mrecg-unit-loss.png"
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["mrecg", "brecq"]
