"""Run-config validation: every bad value names its key and value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedquant.codec import ClipRule, Rounding
from fedquant.config import ConfigError, PayloadMode, RunConfig
from sims.launch.run import default_run_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pyproject_defaults_match_runconfig_defaults() -> None:
    pyproject = default_run_config()
    assert set(pyproject) == set(RunConfig().to_flower())  # every key, no stale one
    assert RunConfig.from_flower(pyproject, strict=True) == RunConfig()


def _readme_defaults() -> dict[str, str]:
    """Key -> default as written in the README's run-config table.

    Rows read ``| `a` / `b` | 1 / 2 | ...`` or ``| `a`, `b` | 1, 2 | ...``.
    """
    text = README.read_text().split("## Running your own configuration", 1)[1]
    table = text.split("\n## ", 1)[0]
    out: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`") or cells[0].startswith("`--"):
            continue
        keys = re.findall(r"`([a-z0-9-]+)`", cells[0])
        sep = " / " if " / " in cells[0] else ", "
        values = cells[1].split(sep)
        assert len(values) == len(keys), line
        for key, value in zip(keys, values, strict=True):
            assert key not in out, f"{key} appears twice in the README's table"
            out[key] = value.strip().strip("`")
    return out


def test_readme_table_lists_every_key_with_its_default() -> None:
    written = _readme_defaults()
    defaults = RunConfig().to_flower()
    assert set(written) == set(defaults)
    for key, default in defaults.items():
        value = written[key]
        if isinstance(default, bool):
            assert value == str(default).lower(), key
        elif isinstance(default, int | float):
            assert float(value) == default, key
        else:
            assert value == (default or '""'), key


def test_parses_flower_values() -> None:
    cfg = RunConfig.from_flower(
        {"bits": 2, "clip": "max", "rounding": "nearest", "payload": "weights", "lr": 1}
    )
    assert (cfg.codec.bits, cfg.codec.clip, cfg.codec.rounding, cfg.codec.payload) == (
        2,
        ClipRule.MAX,
        Rounding.NEAREST,
        PayloadMode.WEIGHTS,
    )
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert RunConfig.from_flower({"bits": 32}).codec.quantized is False


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("bits", 0),
        ("bits", 9),
        ("bits", 16),
        ("bits", True),
        ("bits", "4"),
        ("clip", "median"),
        ("rounding", "up"),
        ("payload", "grads"),
        ("partitioning", "shards"),
        ("dirichlet-alpha", 0.0),
        ("lr", -0.1),
        ("lr", float("nan")),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("num-server-rounds", 0),
        ("local-epochs", 2.5),
        ("batch-size", -1),
        ("momentum", 1.0),
        ("out-dir", ""),
        ("model", "resnet9000"),
        ("min-replies", 0),
        ("min-replies", 11),
        ("update-norm-factor", 0.5),
        ("update-norm-factor", -1.0),
        ("byzantine-clients", -1),
        ("weight-cap", 0.5),
        ("weight-cap", float("inf")),
        ("round-norm-factor", 0.5),
        ("max-num-examples", 1),
        ("resume", "yes"),
        ("client-state-dir", 3),
        ("accountant", "gdp"),
        ("accountant", 1),
        ("dp-noise-seeded", 1),
        ("dp-noise-seeded", "true"),
    ],
)
def test_bad_value_names_key_and_value(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({key: value})
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and repr(value) in str(info.value)


def test_unknown_key_rejected_when_strict() -> None:
    with pytest.raises(ConfigError, match="'bitz'"):
        RunConfig.from_flower({"bitz": 4}, strict=True)
    assert RunConfig.from_flower({"bitz": 4}).extra == {"bitz": 4}


def test_min_replies_more_than_sampled_is_reported_as_impossible() -> None:
    with pytest.raises(ConfigError, match="'min-replies' = 3: impossible: only 2 clients"):
        RunConfig.from_flower({"num-supernodes": 10, "fraction-train": 0.2, "min-replies": 3})
    cfg = RunConfig.from_flower({"num-supernodes": 10, "fraction-train": 0.2, "min-replies": 2})
    assert cfg.robust.min_replies == 2


def test_seeded_dp_noise_is_opt_in_and_says_what_it_gives_up() -> None:
    assert RunConfig().dp.noise_seeded is False and RunConfig().privacy_warning is None
    seeded = RunConfig.from_flower({"dp-noise-seeded": True})
    assert seeded.privacy_warning is not None and "server" in seeded.privacy_warning
    assert RunConfig.from_flower({"dp-noise-seeded": True, "dp": False}).privacy_warning is None
