"""Cross-field config validation and the layer-pattern utilities it relies on."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from nemotron_train.config.loader import ConfigError, load_config
from nemotron_train.config.validate import mamba_in_proj_width, validate_config
from nemotron_train.config.pattern import (
    balanced_stage_sizes,
    layer_types,
    split_stages,
    stage_offset,
    suggest_stage_pattern,
)

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"


# The cases below were written against 8 Mamba heads of dim 16; pin them so the shipped
# smoke model can change without silently changing what these tests exercise.
PINNED = ["model.mamba_num_heads=8", "model.mamba_head_dim=16"]


def smoke(*overrides: str):
    return load_config(SMOKE, PINNED + list(overrides))


# --------------------------------------------------------------------------- pattern


def test_layer_types_strips_boundaries() -> None:
    assert layer_types("M-M|*-") == "M-M*-"


def test_layer_types_names_bad_char_and_position() -> None:
    with pytest.raises(ConfigError) as err:
        layer_types("M*xM")
    assert "model.pattern" in str(err.value) and "'x'" in str(err.value) and "position 2" in str(err.value)


def test_layer_types_rejects_empty() -> None:
    with pytest.raises(ConfigError, match="model.pattern"):
        layer_types("|")


def test_split_even_without_boundaries() -> None:
    assert split_stages("M*-M-M*-", 2) == ["M*-M", "-M*-"]
    assert split_stages("M*-", 1) == ["M*-"]
    assert stage_offset("M*-M-M*-", 2, 1) == 4


def test_split_follows_boundaries() -> None:
    assert split_stages("M-M|*-M-", 2) == ["M-M", "*-M-"]
    assert [stage_offset("M|-M*|-", 3, s) for s in range(3)] == [0, 1, 4]


def test_split_boundary_count_must_equal_pp() -> None:
    with pytest.raises(ConfigError) as err:
        split_stages("M-M|*-M-", 4)
    msg = str(err.value)
    assert "model.pattern" in msg and "parallel.pp=4" in msg and "parallel.pp=2" in msg


def test_split_uneven_suggests_boundaries() -> None:
    with pytest.raises(ConfigError) as err:
        split_stages("M*-M-M*-", 3)
    msg = str(err.value)
    assert "parallel.pp=3" in msg and "`|`" in msg
    suggested = msg.split("model.pattern='")[1].split("'")[0]
    # The suggestion is valid for the same pp and keeps the architecture.
    assert layer_types(suggested) == "M*-M-M*-"
    assert sorted(len(s) for s in split_stages(suggested, 3)) == [2, 3, 3]


def test_split_empty_stage_is_error() -> None:
    with pytest.raises(ConfigError, match="stage 1 is empty"):
        split_stages("M*||-", 3)
    with pytest.raises(ConfigError, match="at least one layer"):
        split_stages("M*-", 4)


def test_split_rejects_bad_pp() -> None:
    with pytest.raises(ConfigError, match="parallel.pp"):
        split_stages("M*-", 0)


def test_balanced_sizes_keep_ends_light() -> None:
    assert balanced_stage_sizes(118, 4) == [29, 30, 30, 29]
    assert balanced_stage_sizes(10, 3) == [3, 4, 3]
    assert sum(balanced_stage_sizes(97, 8)) == 97
    assert len(suggest_stage_pattern("M*-M*-M*-M", 4).split("|")) == 4


# --------------------------------------------------------------------------- validate_config


def test_smoke_is_valid_and_returns_dp() -> None:
    assert validate_config(smoke(), 2) == 1
    assert validate_config(smoke(), 8) == 4
    assert validate_config(smoke("parallel.tp=1", "parallel.sp=false"), 4) == 4


def test_fp8_width_passes_when_aligned() -> None:
    cfg = smoke("precision.fp8.enabled=true", "model.mamba_num_heads=32", "model.mamba_head_dim=16")
    assert mamba_in_proj_width(cfg.model) == 2 * 512 + 2 * 2 * 16 + 32
    assert validate_config(cfg, 2) == 1


def _expect(overrides: List[str], world_size: int, *needles: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(smoke(*overrides), world_size)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize(
    "overrides, world_size, needles",
    [
        ([], 3, ["world size 3", "parallel.tp", "parallel.pp"]),
        (["parallel.cp=2"], 4, ["parallel.cp=2", "cp=1"]),
        (["parallel.tp=4"], 4, ["model.num_query_groups=2", "parallel.tp=4"]),
        (["parallel.tp=4", "model.num_query_groups=4"], 4, ["model.mamba_num_groups=2", "parallel.tp=4"]),
        (["parallel.tp=8", "model.num_attention_heads=8", "model.num_query_groups=8"], 8,
         ["model.mamba_num_groups=2", "parallel.tp=8"]),
        (["model.num_query_groups=3"], 2, ["model.num_attention_heads=4", "model.num_query_groups=3"]),
        (["model.mamba_num_groups=3", "parallel.tp=1", "parallel.sp=false"], 1,
         ["model.mamba_num_heads=8", "model.mamba_num_groups=3", "d_inner=128"]),
        (["model.pattern=M*-M"], 2, ["model.pattern", "4 layers", "model.num_layers=8"]),
        (["model.pattern=M*-M-M*x"], 2, ["model.pattern", "'x'", "position 7"]),
        (["parallel.pp=3"], 6, ["parallel.pp=3", "`|`", "model.pattern='"]),
        (["model.pattern=M*-M|-M*-"], 2, ["parallel.pp=1", "parallel.pp=2"]),
        (["parallel.tp=1"], 1, ["parallel.sp", "parallel.tp"]),
        (["train.global_batch_size=12"], 4, ["train.global_batch_size=12", "4 x 2 = 8"]),
        (["scheduler.rampup_batch_size=[4,4]"], 2, ["scheduler.rampup_batch_size"]),
        (["precision.fp8.enabled=true"], 2, ["precision.fp8.enabled", "in_proj", "328", "164", "parallel.tp=2"]),
        (["precision.fp8.enabled=true", "model.mamba_num_heads=32", "model.ffn_hidden_size=200"], 2,
         ["precision.fp8.enabled", "model.ffn_hidden_size / parallel.tp", "100"]),
        (["precision.fp8.format=e5m2"], 2, ["precision.fp8.format='e5m2'", "hybrid"]),
        (["precision.fp8.recipe=perblock"], 2, ["precision.fp8.recipe", "tensorwise"]),
        (["precision.fp8.first_last_layers_bf16=5"], 2, ["precision.fp8.first_last_layers_bf16=5", "at most 4"]),
        (["model.spec=megatron"], 2, ["model.spec", "auto, te, local"]),
        (["precision.params_dtype=fp16"], 2, ["precision.params_dtype", "fp32, bf16"]),
        (["scheduler.type=linear"], 2, ["scheduler.type", "cosine, wsd, constant"]),
        (["optimizer.name=lion"], 2, ["optimizer.name", "adam"]),
        (["optimizer.min_lr=1.0"], 2, ["optimizer.min_lr", "optimizer.lr"]),
        (["train.steps=0"], 2, ["train.steps=0"]),
        (["train.seq_length=1024"], 2, ["train.seq_length=1024", "model.max_position_embeddings=512"]),
        (["train.log_interval=-1"], 2, ["train.log_interval"]),
        (["train.eval_interval=-5"], 2, ["train.eval_interval"]),
        (["checkpoint.keep_last=0"], 2, ["checkpoint.keep_last"]),
        (["data.source=web"], 2, ["data.source='web'", "blend, bundled, mock"]),
        (["data.source=blend"], 2, ["data.source=blend", "data.blend", "data.train_blend"]),
        (["data.tokenizer.type=gpt2"], 2, ["data.tokenizer.type='gpt2'"]),
        (["launch.nproc_per_node=0"], 2, ["launch.nproc_per_node"]),
        (["model.hidden_size=0"], 2, ["model.hidden_size"]),
    ],
)
def test_validation_failures_name_the_key(overrides: List[str], world_size: int, needles: List[str]) -> None:
    _expect(overrides, world_size, *needles)


def test_blend_source_with_blend_is_valid() -> None:
    cfg = smoke("data.source=blend", "data.blend=[{path: a, weight: 1.0}]", "data.tokenizer.type=hf:tok.json")
    assert validate_config(cfg, 2) == 1
    cfg = smoke("data.source=blend", "data.train_blend=[{path: a, weight: 2}]", "data.tokenizer.type=byte")
    assert validate_config(cfg, 2) == 1


def test_blend_entry_weight_must_be_positive() -> None:
    _expect(["data.source=blend", "data.blend=[{path: a, weight: 0}]"], 2, "data.blend[0].weight")


def test_fp8_enum_checked_even_when_disabled() -> None:
    # A typo in a disabled section still fails early, before someone flips `enabled`.
    _expect(["precision.fp8.enabled=false", "precision.fp8.recipe=tensorwize"], 2, "precision.fp8.recipe")


def test_pipeline_boundaries_validate() -> None:
    cfg = smoke("model.pattern=M*-|M-M*-", "parallel.pp=2")
    assert validate_config(cfg, 4) == 1
