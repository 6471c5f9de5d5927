"""The cost model: layout, parameter counts, memory and FLOPs of a run, computed from the
config alone (no process group, no weights), so it answers instantly even for 56B.
`nemotron-train plan` prints it; the trainer's MFU uses its FLOPs.

Parameters (no biases on linear layers; h hidden, V vocab, t = parallel.tp):
  embedding V*h (first stage), output layer V*h (last stage, untied), final norm h (last stage)
  Mamba-2 layer: norm h + in_proj h*(2*d_inner + 2*G*N + H) + conv1d (d_inner + 2*G*N)*(K + 1)
                 + dt_bias, A_log, D (H each) + gated norm d_inner + out_proj d_inner*h
  attention layer: norm h + qkv h*(nq*d + 2*nkv*d) + out (nq*d)*h
  MLP layer: norm h + 2*h*ffn
  (d_inner = H*P with H Mamba heads of dim P, G groups, N state, K conv kernel.)
Per rank, everything but the pre-layer norms (and the final norm) is sharded t ways; the
vocabulary is padded up to a multiple of make_vocab_size_divisible_by x t (models/vocab.py).

Model FLOPs per token follow Megatron-LM's `num_floating_point_operations` hybrid branch
(s = sequence length, p = nq*d / h, g = KV groups):
  attention 4*h*p*(h + h*g/nq + s/2)      (QKV, out projection, causal QK^T and AV)
  MLP       4*h*ffn
  Mamba-2   2*h*(2*d_in + 2*G*N + H) + 7*d_in*N + 2*d_in*h    (in_proj, scan, out_proj)
  logits    2*h*V
times 3 for forward + backward. Megatron hard-codes d_in = 2*h; we use d_inner = H*P, which
is the same for every Nemotron-H recipe.

Memory per GPU (bytes, heaviest pipeline stage):
  weights   params_per_rank x (2 for bf16, 4 for fp32)
  grads     params_per_rank x 4 (fp32 main grads) or 2 with bf16 params and grad_reduce_in_fp32=false
  optimizer fp32 master copy (when params are bf16) + Adam exp_avg and exp_avg_sq (SGD: momentum),
            divided by the data-parallel size with the distributed optimizer
  fp8 cache FP8 weight copies (row- and column-wise, 1 byte each) of the FP8 layers' weights
  activations: what each layer saves for backward per micro-batch, by layer spec and
            recompute mode (models/activations.py), plus the embedding's token ids on the first
            stage and the final norm and fp32 logits on the last. The 1F1B schedule keeps
            min(pp - stage, micro-batches per step) micro-batches in flight.
Recompute also repeats forward work: `hardware_flops_per_token` (HFU) adds it to the model
FLOPs (MFU), as Megatron reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from nemotron_train.config.schema import Config, ModelConfig
from nemotron_train.config.validate import mamba_d_inner, mamba_in_proj_width
from nemotron_train.config.pattern import ATTENTION, LAYER_CHARS, MAMBA, MLP, layer_name, split_stages
from nemotron_train.models.activations import recompute_flops_per_token, stage_bytes_per_token
from nemotron_train.platform.devices import Device
from nemotron_train.models.vocab import padded_vocab_size

GIB = 1024**3
# Share of a device's memory a plan leaves free for what it does not count.
FIT_RESERVE = 0.05


@dataclass(frozen=True)
class LayerCost:
    params: int  # whole layer
    params_per_rank: int  # one TP rank's share
    flops_per_token: float  # forward only


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def _layer_cost(cfg: Config, char: str) -> LayerCost:
    m, tp = cfg.model, cfg.parallel.tp
    h, s = m.hidden_size, cfg.train.seq_length
    if char == MAMBA:
        d_inner, heads = mamba_d_inner(m), m.mamba_num_heads
        conv_ch = d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim
        width = mamba_in_proj_width(m)
        sharded = h * width + conv_ch * m.conv_kernel + conv_ch + 3 * heads + d_inner + d_inner * h
        flops = 2 * h * width + 7 * d_inner * m.mamba_state_dim + 2 * d_inner * h
    elif char == ATTENTION:
        q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
        sharded = h * (q + 2 * kv) + q * h
        p = q / h
        flops = 4 * h * p * (h + h * m.num_query_groups / m.num_attention_heads + s / 2)
    else:
        assert char == MLP, char
        sharded = 2 * h * m.ffn_hidden_size
        flops = 4 * h * m.ffn_hidden_size
    assert sharded % tp == 0, (char, sharded, tp)  # validate_config checked the divisibility
    return LayerCost(h + sharded, h + sharded // tp, flops)


def _vocab_per_rank(m: ModelConfig, tp: int) -> int:
    """Rows of the embedding / output layer on one TP rank: the padded vocabulary (models/vocab.py)."""
    return padded_vocab_size(m, tp) // tp


def _param_counts(cfg: Config, costs: Dict[str, LayerCost]) -> Dict[str, int]:
    m = cfg.model
    types = m.pattern.replace("|", "")
    embedding = m.vocab_size * m.hidden_size
    output = embedding if m.untie_embeddings_and_output_weights else 0
    layers = sum(costs[c].params for c in types)
    total = embedding + layers + m.hidden_size + output
    return {
        "total_params": total,
        "embedding_params": embedding,
        "output_layer_params": output,
        "layer_params": layers,
        "non_embedding_params": total - embedding - output,
    }


def _optimizer_bytes_per_param(cfg: Config) -> int:
    master = 4 if cfg.precision.params_dtype != "fp32" else 0
    states = 8 if cfg.optimizer.name == "adam" else 4
    return master + states


def _place(key: str) -> str:
    return layer_name(key) if key in LAYER_CHARS else key


def _stage_plan(cfg: Config, costs: Dict[str, LayerCost], stage: int, layers: str, first: int,
                dp: int, num_micro: int, spec: str) -> Dict[str, Any]:
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tp, p.pp
    vocab_rank = _vocab_per_rank(m, tp)
    params = sum(costs[c].params_per_rank for c in layers)
    if stage == 0:
        params += vocab_rank * m.hidden_size
    if stage == pp - 1:
        # An untied output layer, or with pp > 1 the last stage's copy of the tied embedding.
        if m.untie_embeddings_and_output_weights or pp > 1:
            params += vocab_rank * m.hidden_size
        params += m.hidden_size  # final norm
    # Saved activations by place (models/activations.py), recompute included.
    tokens = cfg.train.micro_batch_size * cfg.train.seq_length
    act_places = {_place(k): int(v * tokens) for k, v in
                  stage_bytes_per_token(cfg, spec, layers, stage == 0, stage == pp - 1, vocab_rank).items()}
    act_bytes = sum(act_places.values())
    in_flight = min(pp - stage, num_micro)
    memory = _stage_memory(cfg, costs, layers, first, params, dp)
    memory["activations"] = act_bytes * in_flight
    return {
        "stage": stage,
        "first_layer": first,
        "num_layers": len(layers),
        "layers": layers,
        "layer_counts": {layer_name(c): layers.count(c) for c in LAYER_CHARS},
        "params_per_rank": params,
        "activation_bytes_per_microbatch": act_bytes,
        "activation_breakdown_per_microbatch": act_places,
        "microbatches_in_flight": in_flight,
        "memory_bytes": memory,
        "memory_total_bytes": sum(memory.values()),
    }


def _stage_memory(cfg: Config, costs: Dict[str, LayerCost], layers: str, first: int,
                  params: int, dp: int) -> Dict[str, int]:
    pr = cfg.precision
    grad_bytes = 4 if (pr.grad_reduce_in_fp32 or pr.params_dtype == "fp32") else 2
    optim = params * _optimizer_bytes_per_param(cfg)
    if cfg.optimizer.use_distributed_optimizer:
        optim = math.ceil(optim / dp)
    fp8_cache = 0
    if pr.fp8.enabled:
        keep = pr.fp8.first_last_layers_bf16
        last_fp8 = cfg.model.num_layers - keep
        for i, char in enumerate(layers, start=first):
            if keep <= i < last_fp8:
                fp8_cache += 2 * (costs[char].params_per_rank - cfg.model.hidden_size)
    return {
        "weights": params * _dtype_bytes(pr.params_dtype),
        "grads": params * grad_bytes,
        "optimizer": optim,
        "fp8_cache": fp8_cache,
    }


def _flops(cfg: Config, costs: Dict[str, LayerCost]) -> Dict[str, float]:
    m = cfg.model
    types = m.pattern.replace("|", "")
    parts = {layer_name(c): 3 * types.count(c) * costs[c].flops_per_token for c in LAYER_CHARS}
    parts["logits"] = 3 * 2 * m.hidden_size * m.vocab_size
    return parts


def device_fit(memory_bytes: int, device: Device) -> Dict[str, Any]:
    """Whether `memory_bytes` per GPU fits `device`: the headroom must cover FIT_RESERVE of its
    memory (CUDA context, NCCL buffers, allocator fragmentation, transient tensors)."""
    capacity = int(device.memory_gib * GIB)
    headroom = capacity - memory_bytes
    reserve = int(FIT_RESERVE * capacity)
    return {"name": device.name, "memory_bytes": capacity, "headroom_bytes": headroom,
            "reserve_bytes": reserve, "fits": headroom >= reserve}


def _recompute_summary(cfg: Config) -> str:
    rc = cfg.recompute
    if rc.granularity == "full":
        return f"full, {rc.method}, {rc.num_layers} layer(s)"
    if rc.granularity == "selective":
        return "selective: " + ", ".join(rc.modules)
    return "none"


def _recompute_flops(cfg: Config, costs: Dict[str, LayerCost], stages) -> float:
    """Forward FLOPs per token that recomputation repeats, over all pipeline stages."""
    m = cfg.model
    q = m.num_attention_heads * m.kv_channels
    core_attn = 2 * q * cfg.train.seq_length  # causal QK^T and AV: 4*h*p*s/2
    scan = 7 * mamba_d_inner(m) * m.mamba_state_dim
    layer_flops = {c: costs[c].flops_per_token for c in LAYER_CHARS}
    return sum(recompute_flops_per_token(cfg, layer_flops, st["layers"], core_attn, scan) for st in stages)


def compute_plan(cfg: Config, world_size: Optional[int] = None, device: Optional[Device] = None,
                 spec: Optional[str] = None) -> Dict[str, Any]:
    """Layout, parameter counts, per-GPU memory and model FLOPs of a run (see module docstring);
    with a `device`, also whether the heaviest stage fits it (`device_fit`).

    `cfg` must be valid for `world_size` ranks (default: launch.nproc_per_node x nnodes):
    callers resolve it first (nemotron_train.resolve), which is where errors are reported.
    `spec` is the resolved layer spec (activations differ between te and local); by default
    model.spec, or te for `auto` (a plan is for the GPU)."""
    if world_size is None:
        world_size = cfg.launch.nproc_per_node * cfg.launch.nnodes
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp * p.cp)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    costs = {c: _layer_cost(cfg, c) for c in LAYER_CHARS}
    if spec is None:
        spec = "te" if m.spec == "auto" else m.spec
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    stages, first = [], 0
    for index, layers in enumerate(split_stages(m.pattern, p.pp)):
        stages.append(_stage_plan(cfg, costs, index, layers, first, dp, num_micro, spec))
        first += len(layers)
    heaviest = max(stages, key=lambda st: st["memory_total_bytes"])
    flops = _flops(cfg, costs)
    flops_per_token = sum(flops.values())
    tokens_per_step = t.global_batch_size * t.seq_length
    types = m.pattern.replace("|", "")
    plan = {
        "model": m.name,
        "world_size": world_size,
        "parallel": {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": dp, "sp": p.sp},
        "num_layers": len(types),
        "layer_counts": {layer_name(c): types.count(c) for c in LAYER_CHARS},
        "mamba_d_inner": mamba_d_inner(m),
        # Parameter totals use the true vocabulary (as published counts do); per-rank figures
        # and memory hold the padded one.
        "vocab_size": m.vocab_size,
        "padded_vocab_size": padded_vocab_size(m, p.tp),
        **_param_counts(cfg, costs),
        "params_per_rank": max(st["params_per_rank"] for st in stages),
        "stages": stages,
        "num_microbatches": num_micro,
        "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token,
        "flops_per_token_breakdown": flops,
        "flops_per_step": flops_per_token * tokens_per_step,
        # Model FLOPs (MFU) count the work once; hardware FLOPs (HFU) add what recompute repeats.
        "recompute": _recompute_summary(cfg),
        "hardware_flops_per_token": flops_per_token + _recompute_flops(cfg, costs, stages),
        "memory_per_gpu_bytes": heaviest["memory_total_bytes"],
        "memory_breakdown_bytes": heaviest["memory_bytes"],
        "memory_heaviest_stage": heaviest["stage"],
    }
    if device is not None:
        plan["device"] = device_fit(heaviest["memory_total_bytes"], device)
    return plan
