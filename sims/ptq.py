"""Post-training quantization of a run's final model: after the last round, or later.

    python -m sims.ptq --checkpoint outputs/checkpoint.npz --method mrecg
    python -m sims.ptq --checkpoint outputs --method mrecg --compare brecq --weight-bits 2

The ServerApp calls :func:`quantize_final_model` after the last round when ``ptq`` is
not ``none`` (its section goes into results.json). The command line does the same to a
finished run's checkpoint, without retraining: the model named by the checkpoint's
stored config, the ``ptq-*`` settings from the options (every ``ptq-*`` run-config key
is an option without its ``ptq-`` prefix; ``ptq`` itself is ``--method``), validated
by :class:`fedquant.config.RunConfig` before anything is loaded. It writes
``ptq-<method>.json``, the packed model ``model-ptq-<method>.fqz`` (one per method) and
the per-unit plot ``ptq-<method>-unit-loss.png`` to ``--out`` (default: the
checkpoint's folder), so it never overwrites what the run itself wrote there.
``--compare brecq`` quantizes the same model with a second method and draws both
per-unit loss curves in one plot (BRECQ against MRECG: Ma et al., CVPR 2023, Fig. 1).

Calibration (``ptq-calibration = validation``): the first ``ptq-calibration-size``
images of the embedded MNIST's validation split, which training never reads; the test
split is only evaluated on.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedquant.config import Calibration, ConfigError, ModelName, PTQMethod, PTQSettings, RunConfig
from fedquant.data import Split, load_mnist
from fedquant.files import write_text_atomically
from fedquant.models import build_model, evaluate
from fedquant.ptq import quantize_model, save_quantized
from sims.app.checkpoint import CHECKPOINT_FILE, load_checkpoint
from sims.app.report import plot_ptq_units, ptq_section, ptq_summary, strict_json

MODEL_FILE = "model-ptq.fqz"
"""The ServerApp's packed model, next to results.json."""

PLOT_FILE = "ptq-unit-loss.png"
"""The ServerApp's per-unit loss plot, next to results.json."""


def calibration_images(settings: PTQSettings) -> torch.Tensor | None:
    """The calibration images ``(n, 1, 28, 28)``, or None when ``ptq-calibration`` is none.

    The first ``ptq-calibration-size`` images of MNIST's validation split (all 10,000 if
    it asks for more).
    """
    if settings.calibration is not Calibration.VALIDATION:
        return None
    return load_mnist().val.images[: settings.calibration_size]


def quantize_final_model(
    model_name: ModelName,
    state_dict: Mapping[str, torch.Tensor],
    settings: PTQSettings,
    *,
    test: Split,
    packed_path: Path,
) -> dict[str, Any]:
    """Quantize the model ``state_dict`` holds, save it packed, and return its section.

    The float model and the quantized one are both evaluated on ``test``; the section
    is :func:`sims.app.report.ptq_section`. Raises whatever quantization raises.
    """
    model = _model(model_name, state_dict)
    _, accuracy_fp = evaluate(model, test)
    result = quantize_model(model, settings, calibration=calibration_images(settings))
    _, accuracy_quantized = evaluate(result.model, test)
    packed_path.parent.mkdir(parents=True, exist_ok=True)
    file_bytes = save_quantized(result, packed_path)
    return ptq_section(
        settings,
        result,
        accuracy_fp=accuracy_fp,
        accuracy_quantized=accuracy_quantized,
        file=packed_path.name,
        file_bytes=file_bytes,
    )


def _model(name: ModelName, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    model = build_model(name, seed=0)  # every parameter is then overwritten
    model.load_state_dict(dict(state_dict))
    return model


# Command line ---------------------------------------------------------------------------


def _options() -> dict[str, tuple[str, Any]]:
    """Option dest -> (run-config key, value type) for every field of PTQSettings."""
    hints = typing.get_type_hints(PTQSettings)
    out = {}
    for f in dataclasses.fields(PTQSettings):
        key = str(f.metadata["key"])
        dest = "method" if key == "ptq" else key.removeprefix("ptq-").replace("-", "_")
        out[dest] = (key, hints[f.name])
    return out


def parser() -> argparse.ArgumentParser:
    """The command line: a checkpoint, the ``ptq-*`` settings, --compare and --out."""
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m sims.ptq", description=doc)
    p.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help=f"a finished run's {CHECKPOINT_FILE}, or the folder holding it",
    )
    defaults = RunConfig().to_flower()
    for dest, (key, kind) in _options().items():
        choices = ""
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            choices = f"{', '.join(m.value for m in kind)}; "
            kind = str
        p.add_argument(
            f"--{dest.replace('_', '-')}",
            dest=dest,
            type=kind,
            required=dest == "method",
            default=None,
            help=f"run-config key {key}: {choices}"
            + ("required" if dest == "method" else f"default {defaults[key]!r}"),
        )
    p.add_argument(
        "--compare",
        default=None,
        metavar="METHOD",
        help="quantize with this method too (same settings) and plot both per-unit curves",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the json, plot and packed models (default: the checkpoint's folder)",
    )
    return p


def _run_config(model: str | None, args: argparse.Namespace, method: str) -> RunConfig:
    """The options' ``ptq-*`` keys with ``ptq = method`` (and ``model``), validated.

    Raises ConfigError naming the key and the value.
    """
    keys: dict[str, Any] = {} if model is None else {"model": model}
    for dest, (key, _) in _options().items():
        if (value := getattr(args, dest)) is not None:
            keys[key] = value
    keys["ptq"] = method
    cfg = RunConfig.from_flower(keys, strict=True)
    if cfg.ptq.method is PTQMethod.NONE:
        raise ConfigError("ptq", method, "nothing to quantize; give a method other than 'none'")
    return cfg


def _check_settings(args: argparse.Namespace) -> None:
    """Validate the options for --method and --compare; ConfigError or ValueError."""
    _run_config(None, args, args.method)
    if args.compare is not None:
        if args.compare == args.method:
            raise ValueError(f"--compare {args.compare}: the same method as --method")
        try:
            _run_config(None, args, args.compare)
        except ConfigError as err:  # the rest passed with --method: it is about --compare
            raise ValueError(f"--compare {args.compare}: {err}") from err


def _checkpoint_dir(path: Path) -> Path:
    """The run folder of ``--checkpoint`` (the file itself, or its folder)."""
    if path.is_dir():
        return path
    if path.name != CHECKPOINT_FILE:
        raise ValueError(f"--checkpoint {path}: give a run's {CHECKPOINT_FILE} or its folder")
    return path.parent


def main(argv: Sequence[str] | None = None) -> int:
    """Quantize a finished run's checkpoint from the command line.

    Exit status: 0 when done, 2 for a bad option, run-config value or checkpoint
    (nothing quantized; the message names the key and the value), 1 with a traceback
    when quantization itself fails.
    """
    args = parser().parse_args(argv)
    try:
        _check_settings(args)  # before the checkpoint is read
        run_dir = _checkpoint_dir(args.checkpoint)
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None:
            raise ValueError(f"--checkpoint {args.checkpoint}: no {CHECKPOINT_FILE} there")
        if "model" not in checkpoint.config:
            raise ValueError(f"{run_dir / CHECKPOINT_FILE}: its stored config names no model")
        model = checkpoint.config["model"]
        runs = [_run_config(model, args, args.method)]
        if args.compare is not None:
            runs.append(_run_config(model, args, args.compare))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out_dir = args.out if args.out is not None else run_dir
    test = load_mnist().test
    state_dict = {k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()}
    sections = [
        quantize_final_model(
            cfg.train.model,
            state_dict,
            cfg.ptq,
            test=test,
            packed_path=out_dir / f"model-ptq-{cfg.ptq.method.value}.fqz",
        )
        for cfg in runs
    ]
    name = f"ptq-{runs[0].ptq.method.value}"
    plot = plot_ptq_units(out_dir / f"{name}-unit-loss.png", sections)
    payload = {
        "checkpoint": str(run_dir / CHECKPOINT_FILE),
        "server-round": checkpoint.server_round,
        "model": model,
        "settings": {k: v for k, v in runs[0].to_flower().items() if k.startswith("ptq")},
        "ptq": sections[0],
        "compare": sections[1] if len(sections) > 1 else None,
        "plot": plot.name,
    }
    results = write_text_atomically(out_dir / f"{name}.json", strict_json(payload))
    for section in sections:
        print(ptq_summary(section))
    print(f"results in {results} (plot {plot.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
