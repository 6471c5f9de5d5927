"""TorchMambaMixer: parity with transformers' NemotronH mixer and mcore's MambaMixer layout,
and tensor/sequence/context-parallel equivalence with a single rank, over gloo."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_utils import init_megatron_parallel, run_distributed, single_process_group
from nemotron_train.models.ssd import causal_conv1d_ref, gated_rms_norm_ref, ssd_chunked_ref

# Small but with every axis non-trivial: 8 heads of 4 in 2 groups, state 6, ragged chunks.
DIMS = dict(d_model=32, nheads=8, headdim=4, ngroups=2, dstate=6, chunk=8)
SEQ, BATCH = 21, 2
D_INNER = DIMS["nheads"] * DIMS["headdim"]
GN = DIMS["ngroups"] * DIMS["dstate"]
IN_PROJ_SPLIT = {"z": D_INNER, "x": D_INNER, "B": GN, "C": GN, "dt": DIMS["nheads"]}
CONV_SPLIT = {"x": D_INNER, "B": GN, "C": GN}


@pytest.fixture(scope="module")
def world_of_one():
    with single_process_group():
        yield


def build_mixer(tp: int = 1, sequence_parallel: bool = False, params_dtype=torch.float32, **kw):
    """A TorchMambaMixer over mcore's local (non-TE) parallel linears."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from nemotron_train.models.mamba_mixer import MambaMixerSubmodules, TorchMambaMixer

    cfg = TransformerConfig(
        num_layers=1, hidden_size=DIMS["d_model"], num_attention_heads=4,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, params_dtype=params_dtype,
        mamba_num_heads=DIMS["nheads"], mamba_head_dim=DIMS["headdim"],
        mamba_state_dim=DIMS["dstate"], mamba_num_groups=DIMS["ngroups"],
    )
    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    return TorchMambaMixer(
        cfg, MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        d_model=DIMS["d_model"], chunk_size=DIMS["chunk"], pg_collection=pgs, **kw,
    )


def full_weights(mixer) -> dict:
    return {k: v.detach().clone() for k, v in mixer.state_dict().items()
            if not k.endswith("_extra_state")}


def reference_forward(w: dict, x_LBD, *, rmsnorm=True, headdim=DIMS["headdim"]):
    """The mixer written out with the `*_ref` kernels (TP=1 weights)."""
    zxBCdt = x_LBD.transpose(0, 1) @ w["in_proj.weight"].T
    z, xBC, dt = zxBCdt.split([D_INNER, D_INNER + 2 * GN, DIMS["nheads"]], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), w["conv1d.weight"][:, 0], w["conv1d.bias"], "silu")
    x, B, C = xBC.transpose(1, 2).split([D_INNER, GN, GN], dim=-1)
    b, l = x.shape[:2]
    D = w["D"].view(DIMS["nheads"], -1)
    y = ssd_chunked_ref(
        x.reshape(b, l, -1, headdim), F.softplus(dt + w["dt_bias"]), -torch.exp(w["A_log"]),
        B.reshape(b, l, DIMS["ngroups"], -1), C.reshape(b, l, DIMS["ngroups"], -1), D_H=D,
    ).reshape(b, l, -1)
    if rmsnorm:
        y = gated_rms_norm_ref(y, z, w["norm.weight"], D_INNER // DIMS["ngroups"], 1e-5)
    else:
        y = y * F.silu(z)
    return (y @ w["out_proj.weight"].T).transpose(0, 1)


def test_matches_transformers_nemotron_h_mixer(world_of_one):
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    torch.manual_seed(0)
    ours = build_mixer()
    hf_cfg = NemotronHConfig(
        hidden_size=DIMS["d_model"], mamba_num_heads=DIMS["nheads"], mamba_head_dim=DIMS["headdim"],
        ssm_state_size=DIMS["dstate"], n_groups=DIMS["ngroups"], conv_kernel=4,
        chunk_size=DIMS["chunk"], layer_norm_epsilon=1e-5, layers_block_type=["linear_attention"],
        time_step_min=0.0,  # HF clamps dt from below by this; mcore does not clamp
    )
    theirs = NemotronHMamba2Mixer(hf_cfg, layer_idx=0)
    theirs.load_state_dict(full_weights(ours), strict=True)  # same names, same packing
    x_LBD = torch.randn(SEQ, BATCH, DIMS["d_model"])
    x_ours, x_hf = x_LBD.clone().requires_grad_(), x_LBD.transpose(0, 1).clone().requires_grad_()
    out, out_bias = ours(x_ours)
    out_hf = theirs(x_hf).transpose(0, 1)
    assert out_bias is None and out.shape == x_LBD.shape
    assert (out - out_hf).abs().max().item() <= 1e-4
    g = torch.randn_like(out)
    out.backward(g)
    out_hf.backward(g)
    torch.testing.assert_close(x_ours.grad, x_hf.grad.transpose(0, 1), rtol=1e-4, atol=1e-5)
    hf_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("variant", [dict(D_has_hdim=True), dict(rmsnorm=False),
                                     dict(conv_init=0.3)])
def test_variants_match_reference(world_of_one, variant):
    torch.manual_seed(1)
    mixer = build_mixer(**variant)
    with torch.no_grad():  # D = ones at init would hide a D layout mistake
        mixer.D.normal_()
    x = torch.randn(SEQ, BATCH, DIMS["d_model"])
    out, _ = mixer(x)
    want = reference_forward(full_weights(mixer), x, rmsnorm=variant.get("rmsnorm", True))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def _mcore_mixer_source() -> str:
    spec = importlib.util.find_spec("megatron.core")
    return (Path(spec.origin).parent / "ssm" / "mamba_mixer.py").read_text()


def expected_param_shapes(tp: int = 1) -> dict:
    """Names and per-rank shapes of mcore's MambaMixer parameters (local linear layers)."""
    di, gn, nh = D_INNER // tp, GN // tp, DIMS["nheads"] // tp
    return {
        "dt_bias": (nh,), "A_log": (nh,), "D": (nh,),
        "in_proj.weight": (2 * di + 2 * gn + nh, DIMS["d_model"]),
        "conv1d.weight": (di + 2 * gn, 1, 4), "conv1d.bias": (di + 2 * gn,),
        "norm.weight": (di,), "out_proj.weight": (DIMS["d_model"], di),
    }


def test_parameter_names_shapes_and_attributes_match_mcore(world_of_one):
    src = _mcore_mixer_source()
    # The parameters mcore's MambaMixer defines (it cannot be built here: needs mamba_ssm).
    for attr, ctor in [("dt_bias", "nn.Parameter"), ("A_log", "nn.Parameter"),
                       ("D", "nn.Parameter"), ("conv1d", "nn.Conv1d"),
                       ("norm", "ExtendedRMSNorm"), ("in_proj", "build_module"),
                       ("out_proj", "build_module")]:
        assert re.search(rf"self\.{attr} = {re.escape(ctor)}\(", src), attr
    tp_attrs = set(re.findall(r'setattr\(self\.([\w.]+), "tensor_model_parallel", True\)', src))
    assert tp_attrs == {"conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight"}
    # Its checkpoint splits in_proj into these components, in this order.
    assert re.findall(r'\["(z)", "(x)", "(B)", "(C)", "(dt)"\]', src) == [tuple(IN_PROJ_SPLIT)]

    mixer = build_mixer()
    params = dict(mixer.named_parameters())
    assert {k: tuple(v.shape) for k, v in params.items()} == expected_param_shapes()
    for name in tp_attrs | {"in_proj.weight", "out_proj.weight"}:
        assert getattr(params[name], "tensor_model_parallel", False), name
    assert params["A_log"].dtype == params["D"].dtype == torch.float32


def test_initialisation_like_mcore(world_of_one):
    torch.manual_seed(0)
    mixer = build_mixer(dt_min=0.01, dt_max=0.05, A_init_range=(2, 4))
    dt = F.softplus(mixer.dt_bias.detach())
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    A = mixer.A_log.detach().exp()
    assert ((A >= 2) & (A <= 4)).all() and A.std() > 0
    assert (mixer.D == 1).all() and (mixer.norm.weight == 1).all()
    bound = 1 / math.sqrt(4)  # kaiming_uniform(a=sqrt(5)) over fan_in = d_conv
    assert mixer.conv1d.weight.abs().max() <= bound
    mixer = build_mixer(conv_init=0.01)
    assert mixer.conv1d.weight.abs().max() <= 0.01


def test_bf16_params_and_inference_context_none(world_of_one):
    mixer = build_mixer(params_dtype=torch.bfloat16)
    x = torch.randn(SEQ, BATCH, DIMS["d_model"], dtype=torch.bfloat16)
    out, _ = mixer(x, inference_context=None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    mixer.eval()
    out_eval, _ = mixer(x, inference_context=None, packed_seq_params=None)
    torch.testing.assert_close(out_eval, out)
    with pytest.raises(NotImplementedError):
        mixer(x, packed_seq_params=object())


def test_sharded_state_dict_splits_like_mcore(world_of_one):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    mixer = build_mixer()
    sd = mixer.sharded_state_dict(prefix="layer.mixer.")
    assert {k for k in sd if not k.endswith("_extra_state")} == {
        f"layer.mixer.{k}" for k in expected_param_shapes()}
    pieces = _built_pieces(sd)
    for key, split in (("in_proj.weight", IN_PROJ_SPLIT), ("conv1d.weight", CONV_SPLIT),
                       ("conv1d.bias", CONV_SPLIT)):
        assert isinstance(sd[f"layer.mixer.{key}"], ShardedTensorFactory)
        for part, rows in split.items():
            assert pieces[f"layer.mixer.{key}.{part}"][0][0] == rows
    assert pieces["layer.mixer.A_log"][0] == (DIMS["nheads"],)
    torch.testing.assert_close(pieces["layer.mixer.in_proj.weight.dt"][2],
                               mixer.in_proj.weight[-DIMS["nheads"]:])


def _built_pieces(sd) -> dict:
    """key -> (global shape, global offset, local data) of every ShardedTensor, with
    factories (the split in_proj / conv1d) expanded into their pieces."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for key, item in sd.items():
        items = item.build() if isinstance(item, ShardedTensorFactory) else [item]
        for sh in items:
            if isinstance(sh, ShardedTensor):
                out[sh.key] = (tuple(sh.global_shape), tuple(sh.global_offset),
                               sh.data.detach().clone())
    return out


# --- tensor parallel -----------------------------------------------------------------


def shard_full_weights(w: dict, rank: int, tp: int) -> dict:
    """Per-rank weights from TP=1 ones: packed tensors are split per component, as mcore's
    ColumnParallelLinear rows [z_r, x_r, B_r, C_r, dt_r] and conv channels [x_r, B_r, C_r]."""
    def comp_split(t, split):
        parts = t.split(list(split.values()), dim=0)
        return torch.cat([p.chunk(tp, dim=0)[rank] for p in parts], dim=0)

    return {
        "in_proj.weight": comp_split(w["in_proj.weight"], IN_PROJ_SPLIT),
        "conv1d.weight": comp_split(w["conv1d.weight"], CONV_SPLIT),
        "conv1d.bias": comp_split(w["conv1d.bias"], CONV_SPLIT),
        "out_proj.weight": w["out_proj.weight"].chunk(tp, dim=1)[rank],
        **{k: w[k].chunk(tp, dim=0)[rank] for k in ("dt_bias", "A_log", "D", "norm.weight")},
    }


def unshard_grads(per_rank: list, tp: int) -> dict:
    """Inverse of `shard_full_weights` for the per-rank gradients."""
    def comp_cat(ts, split):
        local = {k: v // tp for k, v in split.items()}
        parts = [t.split(list(local.values()), dim=0) for t in ts]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(len(split))])

    g = {k: [r[k] for r in per_rank] for k in per_rank[0]}
    return {
        "in_proj.weight": comp_cat(g["in_proj.weight"], IN_PROJ_SPLIT),
        "conv1d.weight": comp_cat(g["conv1d.weight"], CONV_SPLIT),
        "conv1d.bias": comp_cat(g["conv1d.bias"], CONV_SPLIT),
        "out_proj.weight": torch.cat(g["out_proj.weight"], dim=1),
        **{k: torch.cat(g[k]) for k in ("dt_bias", "A_log", "D", "norm.weight")},
    }


def _tp_worker(rank, world_size, weights, x_LBD, g_LBD):
    """One TP rank: load its shard of the full weights, run forward + backward, without and
    with sequence parallelism (which needs the CPU platform shims for mcore's buffers)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from nemotron_train.platform import setup_platform

    setup_platform()
    init_megatron_parallel(tp=world_size)
    model_parallel_cuda_manual_seed(1234)
    results = {"A_log_seeded": build_mixer(tp=world_size).A_log.detach()}
    for sp in (False, True):
        mixer = build_mixer(tp=world_size, sequence_parallel=sp)
        params = dict(mixer.named_parameters())
        assert {k: tuple(v.shape) for k, v in params.items()} == expected_param_shapes(world_size)
        with torch.no_grad():
            for name, value in shard_full_weights(weights, rank, world_size).items():
                params[name].copy_(value)
        # Under sequence parallelism each rank holds its slice of the sequence.
        x = (x_LBD.chunk(world_size)[rank] if sp else x_LBD).clone().requires_grad_()
        out, _ = mixer(x)
        out.backward(g_LBD.chunk(world_size)[rank] if sp else g_LBD)
        results[sp] = dict(out=out.detach(), x_grad=x.grad,
                           grads={k: p.grad for k, p in params.items()})
    results["pieces"] = _built_pieces(mixer.sharded_state_dict(prefix="m."))
    results["cp"] = _cp_phase(rank, world_size, weights, x_LBD, g_LBD)
    return results


def cp_zigzag(t_LBD: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """mcore's context-parallel split for attention load balancing: rank r holds sequence
    chunks r and 2cp-1-r of 2cp."""
    chunks = t_LBD.chunk(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def _cp_phase(rank, cp, weights, x_LBD, g_LBD):
    """Context parallel (cp ranks, tp=1): mcore's all-to-all head sharding, reused as is."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    init_megatron_parallel(tp=1, cp=cp)
    mixer = build_mixer()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.copy_(weights[name])
    x = cp_zigzag(x_LBD, rank, cp).clone().requires_grad_()
    out, _ = mixer(x)
    out.backward(cp_zigzag(g_LBD, rank, cp))
    return dict(out=out.detach(), x_grad=x.grad,
                grads={k: p.grad for k, p in mixer.named_parameters()})


TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, reductions split differently across ranks


@pytest.mark.slow
def test_tensor_parallel_2_matches_tp_1(world_of_one):
    torch.manual_seed(0)
    mixer = build_mixer()
    with torch.no_grad():
        mixer.D.normal_()
        mixer.norm.weight.normal_()
    weights = full_weights(mixer)
    seq = 28  # splits for sequence (2) and context (2 x 2) parallelism; not a chunk multiple
    x = torch.randn(seq, BATCH, DIMS["d_model"], requires_grad=True)
    g = torch.randn(seq, BATCH, DIMS["d_model"])
    out, _ = mixer(x)
    out.backward(g)
    ref_pieces = _built_pieces(mixer.sharded_state_dict(prefix="m."))

    ranks = run_distributed(_tp_worker, 2, weights, x.detach(), g)
    for sp in (False, True):
        # Without SP every rank holds the full (all-reduced) output; with SP its slice.
        got_out = [r[sp]["out"] for r in ranks]
        got_xg = [r[sp]["x_grad"] for r in ranks]
        if sp:
            got_out, got_xg = [torch.cat(got_out)], [torch.cat(got_xg)]
        for o, xg in zip(got_out, got_xg):
            torch.testing.assert_close(o, out.detach(), **TOL)
            torch.testing.assert_close(xg, x.grad, **TOL)
        grads = unshard_grads([r[sp]["grads"] for r in ranks], 2)
        for name, p in mixer.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, **TOL,
                                       msg=lambda m: f"sp={sp} grad of {name}: {m}")
    # Context parallel: each rank's zigzag slice of the output and input gradient, and
    # parameter gradients that sum (as DDP's all-reduce over CP would) to TP=1's.
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["cp"]["out"], cp_zigzag(out.detach(), rank, 2), **TOL)
        torch.testing.assert_close(r["cp"]["x_grad"], cp_zigzag(x.grad, rank, 2), **TOL)
    for name, p in mixer.named_parameters():
        torch.testing.assert_close(sum(r["cp"]["grads"][name] for r in ranks), p.grad,
                                   **TOL, msg=lambda m: f"cp grad of {name}: {m}")
    # Per-rank parameters drawn in the model-parallel RNG fork differ between ranks.
    assert not torch.equal(ranks[0]["A_log_seeded"], ranks[1]["A_log_seeded"])
    # Checkpoint layout: the same keys and global shapes at TP=1 and TP=2, and every TP=2
    # piece is the slice of the TP=1 tensor at its global offset, so a checkpoint saved at
    # one TP size loads at the other.
    for r in ranks:
        assert r["pieces"].keys() == ref_pieces.keys()
        for key, (shape, offset, data) in r["pieces"].items():
            ref_shape, _, ref_data = ref_pieces[key]
            assert shape == ref_shape, key
            index = tuple(slice(o, o + n) for o, n in zip(offset, data.shape))
            torch.testing.assert_close(data, ref_data[index], rtol=0, atol=0, msg=key)
    offsets = {r["pieces"]["m.in_proj.weight.dt"][1][0] for r in ranks}
    assert offsets == {0, DIMS["nheads"] // 2}


def test_plugs_into_mcore_mamba_layer(world_of_one):
    """The intended use: mcore's MambaLayer built from a spec with our mixer in it."""
    import dataclasses

    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from nemotron_train.models.mamba_mixer import MambaMixerSubmodules, TorchMambaMixer

    config = dataclasses.replace(build_mixer().config, normalization="RMSNorm",
                                 bias_dropout_fusion=False, hidden_dropout=0.0)
    spec = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(module=TorchMambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pgs)
    assert isinstance(layer.mixer, TorchMambaMixer) and layer.mixer.chunk_size == 128
    x = torch.randn(SEQ, BATCH, DIMS["d_model"], requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())
    # Residual: out = x + mixer(norm(x)).
    mixed, _ = layer.mixer(layer.norm(x.detach()))
    torch.testing.assert_close(out.detach(), x.detach() + mixed.detach())
    keys = {k for k in layer.sharded_state_dict() if not k.endswith("_extra_state")}
    assert {"mixer.in_proj.weight", "mixer.conv1d.weight", "norm.weight"} <= keys
