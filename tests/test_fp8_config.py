"""Backend resolution, refused FP8 combinations, and TransformerEngine recipe construction
(checked against a stand-in `transformer_engine` module: TE is not installed here)."""

import contextlib
import enum
import sys
import types

import pytest

import nemotron_train.fp8.checks as checks
from nemotron_train.config.loader import ConfigError, load_config
from nemotron_train.fp8 import check_fp8_config, layer_fp8_context, make_te_recipe, te_recipe_kwargs
from nemotron_train.resolve import resolve_fp8_backend, resolve_spec

HOPPER, BLACKWELL, ADA, AMPERE, RTX50 = (9, 0), (10, 0), (8, 9), (8, 0), (12, 0)


def cfg(*overrides, fp8=True):
    base = ["model.num_layers=6", f"precision.fp8.enabled={'true' if fp8 else 'false'}"]
    return load_config(None, base + list(overrides))


def refused(c, backend, cap, match, te="2.8.0"):
    with pytest.raises(ConfigError, match=match):
        check_fp8_config(c, backend, cap, te_version_str=te)


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    "recipe,cap",
    [("tensorwise", ADA), ("tensorwise", HOPPER), ("delayed", HOPPER), ("blockwise", HOPPER), ("mxfp8", BLACKWELL)],
)
def test_supported_te_combinations_pass(recipe, cap):
    check_fp8_config(cfg(f"precision.fp8.recipe={recipe}"), "te", cap, te_version_str="2.8.0")


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "mxfp8", "blockwise"])
def test_emulated_runs_every_recipe_without_a_gpu(recipe):
    check_fp8_config(cfg(f"precision.fp8.recipe={recipe}", "precision.fp8.first_last_layers_bf16=1"), "emulated", None)


def test_disabled_fp8_skips_combination_checks_but_not_values():
    check_fp8_config(cfg("precision.fp8.fp8_param_gather=true", fp8=False), "emulated", None)
    with pytest.raises(ConfigError, match=r"precision.fp8.recipe='fp4'.*tensorwise"):
        check_fp8_config(cfg("precision.fp8.recipe=fp4", fp8=False), "emulated", None)


# --------------------------------------------------------------------------- refused


def test_mxfp8_needs_datacenter_blackwell():
    c = cfg("precision.fp8.recipe=mxfp8")
    refused(c, "te", HOPPER, r"mxfp8.*sm_100.*sm_90")
    refused(c, "te", RTX50, r"mxfp8.*sm_120")


def test_blockwise_needs_hopper_and_te_2_3():
    c = cfg("precision.fp8.recipe=blockwise")
    refused(c, "te", ADA, r"blockwise.*Hopper.*sm_89")
    refused(c, "te", HOPPER, r"blockwise needs TransformerEngine >= 2.3; found 2.2.1", te="2.2.1")
    check_fp8_config(c, "te", HOPPER, te_version_str="2.3.0.dev0+5fdd7bb")


def test_te_version_floors():
    refused(cfg("precision.fp8.recipe=tensorwise"), "te", HOPPER, r">= 2.2", te="2.1.0")
    refused(cfg("precision.fp8.recipe=mxfp8"), "te", BLACKWELL, r">= 2.1", te="2.0.0")


def test_te_needs_a_fp8_capable_gpu_and_te(monkeypatch):
    c = cfg()
    refused(c, "te", None, r"backend=te needs a CUDA GPU.*emulated")
    refused(c, "te", AMPERE, r"8.9\+.*sm_80")
    monkeypatch.setattr(checks, "te_version", lambda: None)  # as on a machine without TE
    with pytest.raises(ConfigError, match="transformer_engine is not importable"):
        check_fp8_config(c, "te", HOPPER)


def test_te_refuses_delayed_with_bf16_edge_layers_but_emulation_allows_it():
    c = cfg("precision.fp8.recipe=delayed", "precision.fp8.first_last_layers_bf16=1")
    refused(c, "te", HOPPER, r"first_last_layers_bf16=1 with precision.fp8.recipe=delayed")
    check_fp8_config(c, "emulated", None)


def test_margin_only_where_it_means_something():
    refused(cfg("precision.fp8.margin=1"), "te", HOPPER, r"margin=1.*only.*delayed")
    check_fp8_config(cfg("precision.fp8.margin=1", "precision.fp8.recipe=delayed"), "te", HOPPER, te_version_str="2.8")
    check_fp8_config(cfg("precision.fp8.margin=1"), "emulated", None)  # emulated tensorwise honours it
    refused(cfg("precision.fp8.margin=1", "precision.fp8.recipe=mxfp8"), "emulated", None, r"margin=1.*mxfp8")
    refused(cfg("precision.fp8.margin=-1"), "emulated", None, r"margin=-1 must be >= 0")


def test_fp8_param_gather_needs_te_and_distributed_optimizer():
    refused(cfg("precision.fp8.fp8_param_gather=true"), "emulated", None, r"fp8_param_gather.*backend=te")
    c = cfg("precision.fp8.fp8_param_gather=true", "optimizer.use_distributed_optimizer=false")
    refused(c, "te", HOPPER, r"use_distributed_optimizer=true")
    check_fp8_config(cfg("precision.fp8.fp8_param_gather=true"), "te", HOPPER, te_version_str="2.8")


def test_backend_and_layer_spec_must_match():
    refused(cfg("model.spec=te"), "emulated", None, r"model.spec=te.*silently")
    refused(cfg("model.spec=local"), "te", HOPPER, r"model.spec=local.*silently")


def test_too_many_bf16_layers():
    refused(cfg("precision.fp8.first_last_layers_bf16=4"), "emulated", None, r"first_last_layers_bf16=4.*0 and .*3")


def test_check_needs_a_resolved_backend():
    with pytest.raises(ValueError, match="resolved backend"):
        check_fp8_config(cfg(), "auto", None)


# --------------------------------------------------------------------------- resolve_backend


def resolve_backend(c, device_type, missing_kernels=()):
    """The FP8 backend `nemotron_train.resolve` picks for `c` on `device_type`."""
    return resolve_fp8_backend(c.precision.fp8.backend, resolve_spec(c.model.spec, device_type, list(missing_kernels)))


def test_resolve_backend():
    assert resolve_backend(cfg("precision.fp8.backend=te"), "cpu") == "te"  # checked later, with a message
    assert resolve_backend(cfg("precision.fp8.backend=emulated"), "cuda") == "emulated"
    assert resolve_backend(cfg(), "cpu") == "emulated"
    assert resolve_backend(cfg(), "cuda", missing_kernels=["transformer_engine"]) == "emulated"
    assert resolve_backend(cfg(), "cuda", missing_kernels=["causal_conv1d"]) == "emulated"
    assert resolve_backend(cfg("model.spec=te"), "cuda") == "te"
    assert resolve_backend(cfg("model.spec=local"), "cuda") == "emulated"
    with pytest.raises(ConfigError, match="precision.fp8.backend='tee'"):
        resolve_backend(cfg("precision.fp8.backend=tee"), "cpu")


# --------------------------------------------------------------------------- TE recipes


def test_te_recipe_kwargs():
    assert te_recipe_kwargs(cfg().precision.fp8) == ("Float8CurrentScaling", {"fp8_format": "HYBRID"})
    delayed = cfg(
        "precision.fp8.recipe=delayed",
        "precision.fp8.format=e4m3",
        "precision.fp8.amax_history_len=16",
        "precision.fp8.amax_compute_algo=most_recent",
        "precision.fp8.margin=2",
    ).precision.fp8
    assert te_recipe_kwargs(delayed) == (
        "DelayedScaling",
        {"fp8_format": "E4M3", "margin": 2, "amax_history_len": 16, "amax_compute_algo": "most_recent"},
    )
    assert te_recipe_kwargs(cfg("precision.fp8.recipe=mxfp8").precision.fp8) == (
        "MXFP8BlockScaling",
        {"fp8_format": "HYBRID"},
    )
    assert te_recipe_kwargs(cfg("precision.fp8.recipe=blockwise", "precision.fp8.format=e4m3").precision.fp8) == (
        "Float8BlockScaling",
        {"fp8_format": "E4M3"},
    )


@pytest.fixture
def fake_te(monkeypatch):
    """A minimal stand-in for transformer_engine: recipe classes that record their kwargs."""

    class Format(enum.Enum):
        E4M3 = "e4m3"
        HYBRID = "hybrid"

    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    recipe_mod.Format = Format
    for name in ("DelayedScaling", "Float8CurrentScaling", "MXFP8BlockScaling", "Float8BlockScaling"):
        setattr(recipe_mod, name, lambda _n=name, **kw: (_n, kw))  # a "recipe" is (class name, kwargs)
    calls = []

    def fp8_autocast(**kwargs):
        calls.append(kwargs)
        return contextlib.nullcontext()

    pytorch_mod = types.ModuleType("transformer_engine.pytorch")
    pytorch_mod.fp8_autocast = fp8_autocast
    common = types.ModuleType("transformer_engine.common")
    common.recipe = recipe_mod
    root = types.ModuleType("transformer_engine")
    root.common, root.pytorch = common, pytorch_mod
    for name, mod in {
        "transformer_engine": root,
        "transformer_engine.common": common,
        "transformer_engine.common.recipe": recipe_mod,
        "transformer_engine.pytorch": pytorch_mod,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(Format=Format, calls=calls)


def test_make_te_recipe_builds_te_objects(fake_te):
    name, kwargs = make_te_recipe(cfg("precision.fp8.recipe=delayed", "precision.fp8.amax_history_len=8").precision.fp8)
    assert name == "DelayedScaling"
    assert kwargs == {"fp8_format": fake_te.Format.HYBRID, "margin": 0, "amax_history_len": 8, "amax_compute_algo": "max"}


def test_te_layer_contexts_follow_the_bf16_layer_rule(fake_te):
    c = cfg("precision.fp8.first_last_layers_bf16=2")
    group = object()
    ctx_for = layer_fp8_context(c, "te", amax_group=group)
    for i in range(6):
        with ctx_for(i):
            pass
    # Layers 0, 1, 4, 5 stay BF16 (no TE autocast at all); 2 and 3 enter TE's autocast.
    assert len(fake_te.calls) == 2
    assert all(call["enabled"] and call["fp8_group"] is group for call in fake_te.calls)
    assert fake_te.calls[0]["fp8_recipe"] == ("Float8CurrentScaling", {"fp8_format": fake_te.Format.HYBRID})
