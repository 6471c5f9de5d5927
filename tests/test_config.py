"""Strict YAML loader: unknown keys, includes, overrides, env interpolation, types, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nemotron_train.config.loader import ConfigError, load_config, save_config
from nemotron_train.config.schema import BlendEntry, Config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_and_closest_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "run.yaml", "model:\n  hiden_size: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert "model.hiden_size" in msg
    assert str(cfg) in msg
    assert "model.hidden_size" in msg


def test_unknown_section_suggests_section(tmp_path: Path) -> None:
    cfg = write(tmp_path / "run.yaml", "modle:\n  hidden_size: 128\n")
    with pytest.raises(ConfigError, match=r"`modle`.*did you mean `model`"):
        load_config(cfg)


def test_unknown_key_in_base_names_the_base_file(tmp_path: Path) -> None:
    base = write(tmp_path / "recipes" / "base.yaml", "train:\n  stepz: 3\n")
    child = write(tmp_path / "child.yaml", "base: recipes/base.yaml\nrun:\n  name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert "train.stepz" in str(err.value) and str(base) in str(err.value)


def test_base_include_merges_and_child_wins(tmp_path: Path) -> None:
    write(
        tmp_path / "models" / "m.yaml",
        "model:\n  hidden_size: 128\n  num_layers: 5\ndata:\n  blend:\n"
        "    - {path: a, weight: 1}\n    - {path: b, weight: 2}\n",
    )
    child = write(
        tmp_path / "run.yaml",
        "base: models/m.yaml\nmodel:\n  num_layers: 7\ndata:\n  blend:\n    - {path: c, weight: 3}\n",
    )
    cfg = load_config(child)
    assert cfg.model.hidden_size == 128  # from the base
    assert cfg.model.num_layers == 7  # the including file wins key by key
    assert cfg.data.blend == [BlendEntry(path="c", weight=3.0)]  # lists are replaced, not merged
    assert cfg.model.ffn_hidden_size == Config().model.ffn_hidden_size  # untouched default


def test_base_list_later_file_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train:\n  steps: 1\n  seed: 11\n")
    write(tmp_path / "b.yaml", "train:\n  steps: 2\n")
    cfg = load_config(write(tmp_path / "run.yaml", "base: [a.yaml, b.yaml]\n"))
    assert (cfg.train.steps, cfg.train.seed) == (2, 11)


def test_circular_base_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "run.yaml", "train:\n  steps: 5\n")
    cfg = load_config(cfg_file, ["train.steps=9", "optimizer.lr=1e-3", "parallel.sp=true", "run.name=abc"])
    assert cfg.train.steps == 9
    assert cfg.optimizer.lr == pytest.approx(1e-3)
    assert cfg.parallel.sp is True
    assert cfg.run.name == "abc"


def test_override_without_equals_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(write(tmp_path / "run.yaml", ""), ["train.steps"])


def test_unknown_override_key_names_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "run.yaml", ""), ["train.step=3"])
    assert "train.step" in str(err.value) and "command line" in str(err.value)
    assert "train.steps" in str(err.value)


def test_env_interpolation_whole_value_is_reparsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NT_TEST_STEPS", "42")
    cfg = load_config(write(tmp_path / "run.yaml", "train:\n  steps: ${oc.env:NT_TEST_STEPS}\n"))
    assert cfg.train.steps == 42


def test_env_interpolation_default_and_embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NT_TEST_MISSING", raising=False)
    monkeypatch.setenv("NT_TEST_ROOT", "/data")
    text = "run:\n  output_dir: ${oc.env:NT_TEST_MISSING,runs/x}/y\ndata:\n  cache_dir: ${oc.env:NT_TEST_ROOT}/cache\n"
    cfg = load_config(write(tmp_path / "run.yaml", text))
    assert cfg.run.output_dir == "runs/x/y"
    assert cfg.data.cache_dir == "/data/cache"


def test_env_interpolation_missing_var_names_key_and_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NT_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "run.yaml", "run:\n  output_dir: ${oc.env:NT_TEST_MISSING}/y\n"))
    assert "run.output_dir" in str(err.value) and "NT_TEST_MISSING" in str(err.value)


def test_env_interpolation_in_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NT_TEST_SEED", "77")
    cfg = load_config(write(tmp_path / "run.yaml", ""), ["train.seed=${oc.env:NT_TEST_SEED}"])
    assert cfg.train.seed == 77


@pytest.mark.parametrize(
    "text, key, what",
    [
        ("train:\n  steps: ten\n", "train.steps", "integer"),
        ("train:\n  steps: 1.5\n", "train.steps", "integer"),
        ("parallel:\n  sp: 1\n", "parallel.sp", "true or false"),
        ("optimizer:\n  lr: fast\n", "optimizer.lr", "number"),
        ("model: 3\n", "model", "mapping"),
        ("data:\n  blend: a.bin\n", "data.blend", "list"),
        ("run:\n  name: [a, b]\n", "run.name", "string"),
    ],
)
def test_type_errors_name_key(tmp_path: Path, text: str, key: str, what: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "run.yaml", text))
    assert key in str(err.value) and what in str(err.value)


def test_scientific_notation_strings_become_floats(tmp_path: Path) -> None:
    # PyYAML reads `1e-5` (no dot) as a string; float fields must still accept it.
    cfg = load_config(write(tmp_path / "run.yaml", "model:\n  norm_epsilon: 1e-5\n"))
    assert cfg.model.norm_epsilon == pytest.approx(1e-5)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.pattern = "M-M|*-"
    cfg.model.num_layers = 5
    cfg.parallel.pp = 2
    cfg.data.blend = [BlendEntry(path="a/b_text_document", weight=0.25), BlendEntry(path="c", weight=0.75)]
    cfg.scheduler.rampup_batch_size = [16, 16, 1000]
    cfg.train.exit_duration_minutes = 12.5
    cfg.checkpoint.dir = None
    out = tmp_path / "nested" / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert not out.with_suffix(".yaml.tmp").exists()
