"""Every shipped config loads and validates; model recipes match the published architectures
and their parameter counts match the reference NemotronH implementation in transformers."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest
import yaml

from nemotron_train.config.loader import load_config
from nemotron_train.config.schema import ModelConfig
from nemotron_train.config.validate import validate_config
from nemotron_train.config.pattern import layer_types
from nemotron_train.models.cost import compute_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
MODEL_RECIPES = sorted((CONFIGS / "models").glob("*.yaml"))
ENV_VARS = ("NEMOTRON_DATA", "NEMOTRON_TOKENIZER", "NEMOTRON_RUNS")

# name: (layers, Mamba-2, attention, MLP, hidden, ffn, params in billions) as published.
PUBLISHED = {
    "nemotron_h_8b": (52, 24, 4, 24, 4096, 21504, 8.1),
    "nemotron_h_47b": (98, 45, 5, 48, 8192, 30720, 46.8),
    "nemotron_h_56b": (118, 54, 10, 54, 8192, 32768, 56.3),
}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Recipes must load with their documented defaults, whatever the caller's environment.
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def _is_model_recipe(path: Path) -> bool:
    return path.parent == CONFIGS / "models"


def test_configs_exist() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    for required in ("smoke.yaml", "nemotron_h_8b_pretrain.yaml", "nemotron_h_8b_tp4.yaml",
                     "nemotron_h_47b_pretrain.yaml", "nemotron_h_56b_pretrain.yaml",
                     "models/nemotron_h_8b.yaml", "models/nemotron_h_47b.yaml", "models/nemotron_h_56b.yaml"):
        assert required in names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_loads_and_validates(path: Path) -> None:
    # Model recipes hold only a `model:` section; give them a data source to validate against.
    overrides: List[str] = ["data.source=mock"] if _is_model_recipe(path) else []
    cfg = load_config(path, overrides)
    world_size = cfg.launch.nproc_per_node * cfg.launch.nnodes
    dp = validate_config(cfg, world_size)
    assert dp >= 1
    assert len(layer_types(cfg.model.pattern)) == cfg.model.num_layers


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=lambda p: p.stem)
def test_model_recipes_hold_only_the_model(path: Path) -> None:
    assert set(yaml.safe_load(path.read_text())) == {"model"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_recipe_matches_published_architecture(name: str) -> None:
    m = load_config(CONFIGS / "models" / f"{name}.yaml").model
    layers, mamba, attn, mlp, hidden, ffn, billions = PUBLISHED[name]
    types = layer_types(m.pattern)
    assert (len(types), types.count("M"), types.count("*"), types.count("-")) == (layers, mamba, attn, mlp)
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (layers, hidden, ffn)
    assert m.num_attention_heads * m.kv_channels == hidden  # query width = hidden for all three
    assert (m.num_query_groups, m.kv_channels, m.mamba_head_dim, m.mamba_num_groups) == (8, 128, 64, 8)
    assert m.mamba_num_heads * m.mamba_head_dim == 2 * hidden  # Mamba expand 2
    assert (m.vocab_size, m.max_position_embeddings, m.conv_kernel, m.chunk_size) == (131072, 8192, 4, 128)
    assert m.untie_embeddings_and_output_weights
    total = compute_plan(load_config(CONFIGS / "models" / f"{name}.yaml", ["data.source=mock"]), 1)["total_params"]
    assert total / 1e9 == pytest.approx(billions, abs=0.05)


@pytest.mark.parametrize("run, model", [
    ("nemotron_h_8b_pretrain", "nemotron_h_8b"),
    ("nemotron_h_8b_tp4", "nemotron_h_8b"),
    ("nemotron_h_47b_pretrain", "nemotron_h_47b"),
    ("nemotron_h_56b_pretrain", "nemotron_h_56b"),
])
def test_pretrain_runs_use_their_model_unchanged(run: str, model: str) -> None:
    run_cfg = load_config(CONFIGS / f"{run}.yaml")
    model_cfg = load_config(CONFIGS / "models" / f"{model}.yaml").model
    got = run_cfg.model
    # `|` pipeline boundaries and the layer implementation may differ; the architecture may not.
    assert layer_types(got.pattern) == layer_types(model_cfg.pattern)
    got_fields = {k: v for k, v in vars(got).items() if k not in ("pattern", "spec")}
    want_fields = {k: v for k, v in vars(model_cfg).items() if k not in ("pattern", "spec")}
    assert got_fields == want_fields
    assert run_cfg.train.global_batch_size == 768 and run_cfg.train.seq_length == 8192
    assert run_cfg.precision.params_dtype == "bf16" and run_cfg.parallel.sp
    fp8 = run_cfg.precision.fp8
    assert (fp8.enabled, fp8.recipe, fp8.format, fp8.first_last_layers_bf16) == (True, "tensorwise", "hybrid", 2)


# Published layouts (each recipe's header names its source): (tp, pp, sp, GPUs).
PUBLISHED_LAYOUTS = {
    "nemotron_h_8b_pretrain": (2, 1, True, 128),
    "nemotron_h_47b_pretrain": (8, 1, True, 256),
    "nemotron_h_56b_pretrain": (8, 1, True, 256),
}
PRETRAIN_RECIPES = sorted(p.stem for p in CONFIGS.glob("*_pretrain.yaml"))


@pytest.mark.parametrize("name", sorted(PUBLISHED_LAYOUTS))
def test_pretrain_recipes_use_the_published_layout(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    p = cfg.parallel
    assert (p.tp, p.pp, p.sp, cfg.launch.nproc_per_node * cfg.launch.nnodes) == PUBLISHED_LAYOUTS[name]
    assert "Layout source:" in (CONFIGS / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", PRETRAIN_RECIPES)
def test_pretrain_recipe_fits_its_device(name: str) -> None:
    """`plan` (the te spec on the default device, an H100) must leave the reserve free."""
    from nemotron_train.platform.devices import DEFAULT_DEVICE, get_device

    cfg = load_config(CONFIGS / f"{name}.yaml")
    plan = compute_plan(cfg, device=get_device(DEFAULT_DEVICE), spec="te")
    fit = plan["device"]
    assert fit["fits"], (name, plan["memory_per_gpu_bytes"] / 2**30, fit)
    assert fit["headroom_bytes"] == fit["memory_bytes"] - plan["memory_per_gpu_bytes"]


def test_smoke_has_every_layer_type_and_is_tiny() -> None:
    cfg = load_config(CONFIGS / "smoke.yaml")
    assert set(layer_types(cfg.model.pattern)) == {"M", "*", "-"}
    assert cfg.model.vocab_size <= 512 and cfg.model.hidden_size <= 64
    assert (cfg.data.source, cfg.data.tokenizer.type) == ("bundled", "bundled")
    assert cfg.parallel.tp == cfg.launch.nproc_per_node == 2 and cfg.parallel.sp
    assert cfg.train.deterministic and cfg.model.spec == "local"


# --------------------------------------------------------------------------- transformers reference


def _hf_param_count(m: ModelConfig) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.NemotronHConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        hybrid_override_pattern=layer_types(m.pattern),
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels,
        intermediate_size=m.ffn_hidden_size,
        mamba_num_heads=m.mamba_num_heads,
        mamba_head_dim=m.mamba_head_dim,
        ssm_state_size=m.mamba_state_dim,
        n_groups=m.mamba_num_groups,
        conv_kernel=m.conv_kernel,
        chunk_size=m.chunk_size,
        max_position_embeddings=m.max_position_embeddings,
        layer_norm_epsilon=m.norm_epsilon,
        initializer_range=m.init_method_std,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        use_bias=False,
        mlp_bias=False,
        attention_bias=False,
        use_conv_bias=True,
    )
    assert hf_cfg.num_hidden_layers == m.num_layers
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = transformers.NemotronHForCausalLM(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", MODEL_RECIPES + [CONFIGS / "smoke.yaml"], ids=lambda p: p.stem)
def test_param_count_matches_transformers(path: Path) -> None:
    cfg = load_config(path, ["data.source=mock"] if _is_model_recipe(path) else [])
    plan = compute_plan(cfg, 1 if _is_model_recipe(path) else None)
    assert plan["total_params"] == _hf_param_count(cfg.model)



@pytest.mark.parametrize("overrides", [
    ["model.mamba_num_heads=16", "model.mamba_state_dim=32", "model.conv_kernel=3"],  # d_inner = 4 x hidden
    ["model.num_query_groups=1", "model.kv_channels=32", "model.ffn_hidden_size=96", "model.mamba_num_groups=1",
     "parallel.tp=1", "parallel.sp=false"],
    ["model.pattern=MMMM-M**", "model.vocab_size=1000", "parallel.tp=1", "parallel.sp=false"],
])
def test_param_count_matches_transformers_off_recipe_shapes(overrides: List[str]) -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", overrides)
    assert compute_plan(cfg)["total_params"] == _hf_param_count(cfg.model)
