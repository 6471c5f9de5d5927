"""Unit tests of the HF <-> our checkpoint mapping (nemotron_train/hf/mapping.py).

No process groups, no files: the mapping is pure, so it is checked on synthetic tensors
and against the module names of transformers' own NemotronH.
"""

import dataclasses

import pytest
import torch

from nemotron_train.hf.mapping import (
    HFConversionError,
    from_disk_names,
    from_hf_config,
    from_hf_state_dict,
    hf_shapes,
    mcore_shapes,
    pack_qkv,
    to_disk_names,
    to_hf_config,
    to_hf_state_dict,
    unpack_qkv,
)
from nemotron_train.config.schema import ModelConfig

TINY = ModelConfig(
    pattern="M*-M-*",
    num_layers=6,
    hidden_size=32,
    ffn_hidden_size=48,
    num_attention_heads=8,
    num_query_groups=2,
    kv_channels=4,
    mamba_num_heads=4,
    mamba_head_dim=8,
    mamba_state_dim=6,
    mamba_num_groups=2,
    conv_kernel=4,
    chunk_size=8,
    vocab_size=40,
    max_position_embeddings=128,
)


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


# --------------------------------------------------------------------------- QKV packing


def _labelled_qkv(num_heads, num_groups, head_dim, hidden):
    """q/k/v whose every row says which tensor, head and row it is: 1000*kind + 10*head + row."""
    rows = lambda kind, heads: torch.tensor(
        [[1000.0 * kind + 10 * h + r] * hidden for h in range(heads) for r in range(head_dim)]
    )
    return rows(1, num_heads), rows(2, num_groups), rows(3, num_groups)


def test_pack_qkv_puts_each_groups_query_heads_then_key_then_value():
    np_, ng, hd, hidden = 8, 2, 3, 5
    q, k, v = _labelled_qkv(np_, ng, hd, hidden)
    packed = pack_qkv(q, k, v, np_, ng, hd)
    assert packed.shape == ((np_ + 2 * ng) * hd, hidden)
    expected = []
    for g in range(ng):
        # mcore's order within a group: its np/ng query heads, one key head, one value head.
        heads = [(1, g * (np_ // ng) + j) for j in range(np_ // ng)] + [(2, g), (3, g)]
        expected += [1000.0 * kind + 10 * h + r for kind, h in heads for r in range(hd)]
    assert packed[:, 0].tolist() == expected
    assert torch.equal(packed[:, 0:1].expand(-1, hidden), packed)


@pytest.mark.parametrize("num_groups", [1, 2, 4, 8])
def test_qkv_round_trip_is_bitwise(num_groups):
    np_, hd, hidden = 8, 4, 16
    g = torch.Generator().manual_seed(num_groups)
    q = torch.randn(np_ * hd, hidden, generator=g)
    k = torch.randn(num_groups * hd, hidden, generator=g)
    v = torch.randn(num_groups * hd, hidden, generator=g)
    q2, k2, v2 = unpack_qkv(pack_qkv(q, k, v, np_, num_groups, hd), np_, num_groups, hd)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_packed_qkv_gives_the_same_gqa_attention_as_separate_projections():
    """Attention computed the mcore way (split the fused projection per group) equals the HF
    way (separate q/k/v, key/value heads repeated for their query heads)."""
    np_, ng, hd, hidden, s = 8, 2, 4, 16, 5
    g = torch.Generator().manual_seed(1)
    q_w, k_w, v_w = (torch.randn(n * hd, hidden, generator=g) for n in (np_, ng, ng))
    x = torch.randn(s, hidden, generator=g)

    def attend(q, k, v):  # [heads, s, hd] each
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    # HF: query head h uses key/value head h // (np/ng).
    rep = np_ // ng
    q, k, v = ((x @ w.T).view(s, -1, hd).transpose(0, 1) for w in (q_w, k_w, v_w))
    hf_out = attend(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0))
    # mcore: [s, ng, (rep + 2) * hd] split into rep query heads, one key, one value per group.
    mixed = (x @ pack_qkv(q_w, k_w, v_w, np_, ng, hd).T).view(s, ng, (rep + 2) * hd)
    mq, mk, mv = torch.split(mixed, [rep * hd, hd, hd], dim=-1)
    mq = mq.reshape(s, np_, hd).transpose(0, 1)
    mk, mv = (t.transpose(0, 1).repeat_interleave(rep, 0) for t in (mk, mv))
    assert torch.allclose(attend(mq, mk, mv), hf_out, atol=1e-6)


def test_unpack_qkv_rejects_a_wrong_shape():
    with pytest.raises(HFConversionError, match=r"expected \(48, hidden\)"):
        unpack_qkv(torch.zeros(40, 16), 8, 2, 4)


# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("untie", [True, False])
def test_state_dict_round_trip_is_bitwise(untie):
    m = dataclasses.replace(TINY, untie_embeddings_and_output_weights=untie)
    ours = _random_state(mcore_shapes(m))
    hf = to_hf_state_dict(ours, m)
    assert {k: tuple(v.shape) for k, v in hf.items()} == hf_shapes(m)
    assert ("lm_head.weight" in hf) == untie
    back = from_hf_state_dict(hf, m)
    assert list(back) == list(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_every_layer_kind_maps_to_the_documented_hf_names():
    ours = _random_state(mcore_shapes(TINY))
    hf = to_hf_state_dict(ours, TINY)
    assert hf["model.embeddings.weight"] is ours["embedding.word_embeddings.weight"]
    assert hf["model.norm_f.weight"] is ours["decoder.final_norm.weight"]
    assert hf["lm_head.weight"] is ours["output_layer.weight"]
    assert hf["model.layers.0.norm.weight"] is ours["decoder.layers.0.norm.weight"]
    for p in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
        assert hf[f"model.layers.3.mixer.{p}"] is ours[f"decoder.layers.3.mixer.{p}"]
    assert hf["model.layers.1.norm.weight"] is ours["decoder.layers.1.input_layernorm.weight"]
    assert hf["model.layers.1.mixer.o_proj.weight"] is ours["decoder.layers.1.self_attention.linear_proj.weight"]
    assert hf["model.layers.2.norm.weight"] is ours["decoder.layers.2.pre_mlp_layernorm.weight"]
    assert hf["model.layers.2.mixer.up_proj.weight"] is ours["decoder.layers.2.mlp.linear_fc1.weight"]
    assert hf["model.layers.2.mixer.down_proj.weight"] is ours["decoder.layers.2.mlp.linear_fc2.weight"]
    q, k, v = unpack_qkv(ours["decoder.layers.5.self_attention.linear_qkv.weight"], 8, 2, 4)
    assert torch.equal(hf["model.layers.5.mixer.q_proj.weight"], q)
    assert torch.equal(hf["model.layers.5.mixer.k_proj.weight"], k)
    assert torch.equal(hf["model.layers.5.mixer.v_proj.weight"], v)


def test_transformer_engine_names_export_like_local_ones():
    ours = _random_state(mcore_shapes(TINY))
    te_names = {
        "decoder.layers.0.norm.weight": "decoder.layers.0.mixer.in_proj.layer_norm_weight",
        "decoder.layers.1.input_layernorm.weight": "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.2.pre_mlp_layernorm.weight": "decoder.layers.2.mlp.linear_fc1.layer_norm_weight",
    }
    te = {te_names.get(k, k): v for k, v in ours.items()}
    te["decoder.layers.1.self_attention.core_attention._extra_state"] = None
    local_hf, te_hf = to_hf_state_dict(ours, TINY), to_hf_state_dict(te, TINY)
    assert list(local_hf) == list(te_hf)
    assert all(torch.equal(local_hf[k], te_hf[k]) for k in local_hf)


def test_disk_names_use_the_backbone_prefix():
    hf = {"model.embeddings.weight": torch.zeros(1), "lm_head.weight": torch.ones(1)}
    disk = to_disk_names(hf)
    assert list(disk) == ["backbone.embeddings.weight", "lm_head.weight"]
    assert list(from_disk_names(disk)) == list(hf)
    assert list(from_disk_names(hf)) == list(hf)  # `model.` files are accepted as they are


def test_missing_and_misshaped_weights_are_named():
    hf = to_hf_state_dict(_random_state(mcore_shapes(TINY)), TINY)
    broken = dict(hf)
    del broken["model.layers.3.mixer.A_log"]
    with pytest.raises(HFConversionError, match=r"missing: model\.layers\.3\.mixer\.A_log"):
        from_hf_state_dict(broken, TINY)
    broken = dict(hf, **{"model.layers.2.mixer.up_proj.weight": torch.zeros(47, 32)})
    with pytest.raises(HFConversionError, match=r"up_proj\.weight` has shape \(47, 32\).*expects \(48, 32\)"):
        from_hf_state_dict(broken, TINY)
    with pytest.raises(HFConversionError, match=r"unexpected: model\.layers\.2\.mixer\.up_proj\.bias"):
        from_hf_state_dict(dict(hf, **{"model.layers.2.mixer.up_proj.bias": torch.zeros(48)}), TINY)
    ours = _random_state(mcore_shapes(TINY))
    del ours["decoder.final_norm.weight"]
    with pytest.raises(HFConversionError, match=r"missing: decoder\.final_norm\.weight"):
        to_hf_state_dict(ours, TINY)


def test_mtp_weights_and_a_tied_lm_head_are_dropped_on_import():
    tied = dataclasses.replace(TINY, untie_embeddings_and_output_weights=False)
    hf = to_hf_state_dict(_random_state(mcore_shapes(tied)), tied)
    hf["lm_head.weight"] = hf["model.embeddings.weight"]
    hf["mtp.layers.0.norm.weight"] = torch.zeros(32)
    assert list(from_hf_state_dict(hf, tied)) == list(mcore_shapes(tied))


# --------------------------------------------------------------------------- configs


def test_config_round_trip():
    hf = to_hf_config(TINY, "bf16")
    assert hf["model_type"] == "nemotron_h" and hf["architectures"] == ["NemotronHForCausalLM"]
    assert hf["hybrid_override_pattern"] == "M*-M-*" and hf["num_hidden_layers"] == 6
    assert hf["dtype"] == "bfloat16" and hf["mlp_hidden_act"] == "relu2"
    assert from_hf_config(hf, name=TINY.name) == TINY


def test_pipeline_boundaries_are_not_exported():
    staged = dataclasses.replace(TINY, pattern="M*-|M-*")
    assert to_hf_config(staged, "fp32")["hybrid_override_pattern"] == "M*-M-*"


def test_config_from_transformers_names_and_legacy_names():
    new = to_hf_config(TINY, "fp32")
    del new["hybrid_override_pattern"]
    new["layers_block_type"] = ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "full_attention"]
    assert from_hf_config(new).pattern == "M*-M-*"
    legacy = to_hf_config(TINY, "fp32")
    for old, cur in (("mamba_n_groups", "n_groups"), ("mamba_d_conv", "conv_kernel"), ("mamba_chunk_size", "chunk_size")):
        legacy[old] = legacy.pop(cur)
    del legacy["hybrid_override_pattern"]
    legacy["layers_block_type"] = ["mamba", "attention", "mlp", "mamba", "mlp", "attention"]
    assert from_hf_config(legacy, name=TINY.name) == TINY


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hybrid_override_pattern": "M*E-"}, r"hybrid_override_pattern\[2\]='E'.*MoE"),
        ({"layers_block_type": ["linear_attention", "moe"]}, r"layers_block_type\[1\]='moe'"),
        ({"mlp_hidden_act": "gelu"}, r"mlp_hidden_act='gelu'.*must be 'relu2'"),
        ({"use_bias": True}, r"use_bias=True"),
        ({"sliding_window": 512}, r"sliding_window=512"),
        ({"model_type": "llama"}, r"model_type='llama'"),
    ],
)
def test_unsupported_hf_configs_are_rejected_with_the_key(change, match):
    hf = to_hf_config(TINY, "fp32")
    hf.update(change)
    with pytest.raises(HFConversionError, match=match):
        from_hf_config(hf)


def test_missing_required_hf_key_is_named():
    hf = to_hf_config(TINY, "fp32")
    del hf["mamba_head_dim"]
    with pytest.raises(HFConversionError, match="missing `mamba_head_dim`"):
        from_hf_config(hf)


@pytest.mark.parametrize("untie", [True, False])
def test_names_and_shapes_match_transformers_nemotron_h(untie):
    transformers = pytest.importorskip("transformers")
    m = dataclasses.replace(TINY, untie_embeddings_and_output_weights=untie)
    config = transformers.NemotronHConfig(**to_hf_config(m, "fp32"))
    assert config.layers_block_type == ["linear_attention", "full_attention", "mlp", "linear_attention", "mlp", "full_attention"]
    model = transformers.NemotronHForCausalLM(config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not untie:  # the tied head is the embedding, which is saved once
        theirs.pop("lm_head.weight")
    assert theirs == hf_shapes(m)
