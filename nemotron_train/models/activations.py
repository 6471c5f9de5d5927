"""Activation memory: the bytes each layer saves for backward, per token and TP rank, for
each layer spec and recompute mode; and the forward FLOPs recomputation adds.

The counts follow the tensors the implementations save (bench/memory.py measures them for
the local spec with autograd's saved-tensor hooks and compares with these numbers).
Notation: h hidden, a bytes per activation element (params dtype), c = 4 (fp32: the local
spec computes norms and the SSD scan in fp32), t TP size, sp = t under sequence parallelism
else 1, s sequence length; Mamba: W in_proj width, X conv channels (d_inner + 2GN), d_inner,
H heads, P head dim, G groups, N state, Q chunk, K conv kernel; attention: nq heads, nkv
KV heads, d head dim; MLP: f = ffn width.

local spec (pure torch):
  pre-norm   2ch + c + ah   (fp32 copy of the input, rsqrt, normalised, output)   / sp
             recompute norm: ah (the input; the output is freed and rebuilt)       / sp
  Mamba-2    a X (2 + (K-1)/s)  conv input and padded output
             + c H              softplus(dt) input
             + c (3 d_inner + 5H + 2GN + GQ + H P N (2 + Q/s) / Q)   SSD scan
             + c (4 d_inner + G) + a d_inner + z                      gated norm
               (z = c d_inner, or the whole in_proj output c W when a = c)
             recompute mamba: a W + a d_inner (in_proj output, out_proj input)
  attention  per rank n = nq/t heads, g = nkv/t groups: a (q + held + kv + n d) + c n with
             q = n d if 1 < g < n (a reshaped copy) else 0 (a view), held = (n + 2g) d (the qkv GEMM
             output) if g = 1 or n = g else 0, kv = 2 n d (K and V repeated) if n != g else 0
             recompute core_attn: a (q + (n + 2g) d + n d)
  MLP        2 a f  (relu output, squared output)       recompute mlp: 0 beyond the norm
te spec (TE linears with fused norms, flash attention, mamba-ssm kernels; GPU estimate):
  pre-norm   2ah + c  (input and norm output)          / sp; recompute norm: unchanged (fused)
  Mamba-2    a (W + X + 2 d_inner) + 2cH               recompute mamba: a (W + d_inner)
  attention  a (q + (n + 2g) d + n d) + c n (as local, no repeats)  recompute core_attn: no c n
  MLP        2 a f                                     recompute mlp: 0 beyond the norm
Full recompute keeps only each checkpointed chunk's input, a h / sp per token.
Stage extras: the first stage saves the token ids (8 bytes; 9 with TP); the last stage the
final norm and the vocab-parallel cross entropy's fp32 logits (c V / t) and targets (9 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from nemotron_train.config.pattern import ATTENTION, MAMBA, MLP
from nemotron_train.config.schema import Config
from nemotron_train.config.validate import mamba_d_inner, mamba_in_proj_width

FP32 = 4


@dataclass(frozen=True)
class Shape:
    """What one rank sees of the model: widths divided by TP where they are sharded."""

    cfg: Config
    spec: str

    @property
    def a(self) -> int:
        return 2 if self.cfg.precision.params_dtype == "bf16" else 4

    @property
    def tp(self) -> int:
        return self.cfg.parallel.tp

    @property
    def sp(self) -> int:
        p = self.cfg.parallel
        return p.tp if p.sp and p.tp > 1 else 1


def _selective(cfg: Config) -> Sequence[str]:
    rc = cfg.recompute
    return rc.modules if rc.granularity == "selective" else ()


def norm_bytes(sh: Shape) -> float:
    """A pre-layer (or final) RMSNorm, per token."""
    h, a = sh.cfg.model.hidden_size, sh.a
    if sh.spec == "te":
        per_token = 2 * a * h + FP32
    elif "norm" in _selective(sh.cfg):
        per_token = a * h
    else:
        per_token = 2 * FP32 * h + FP32 + a * h
    return per_token / sh.sp


def mamba_bytes(sh: Shape) -> float:
    m, a, t, s = sh.cfg.model, sh.a, sh.tp, sh.cfg.train.seq_length
    d_inner, W = mamba_d_inner(m), mamba_in_proj_width(m)
    H, P, G, N, Q, K = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim, m.chunk_size, m.conv_kernel
    X = d_inner + 2 * G * N
    if "mamba" in _selective(sh.cfg):
        inner = a * (W + d_inner)
    elif sh.spec == "te":
        inner = a * (W + X + 2 * d_inner) + 2 * FP32 * H
    else:
        Q = min(Q, s)
        conv = a * X * (2 + (K - 1) / s)
        scan = FP32 * (3 * d_inner + 5 * H + 2 * G * N + G * Q + H * P * N * (2 + Q / s) / Q)
        z = FP32 * W if a == FP32 else FP32 * d_inner
        gated = FP32 * (4 * d_inner + G) + a * d_inner + z
        inner = conv + FP32 * H + scan + gated
    return norm_bytes(sh) + inner / t


def attention_bytes(sh: Shape) -> float:
    m, a, t = sh.cfg.model, sh.a, sh.tp
    d = m.kv_channels
    n, g = m.num_attention_heads // t, m.num_query_groups // t  # heads and KV groups per rank
    lse = FP32 * n
    # mcore splits the qkv GEMM output per group: q is a view of it with one group per rank or
    # one head per group (else a reshaped copy); k and v stay views of it unless SDPA needs
    # them repeated to every head (TE's attention takes the groups as they are).
    q_copy = n * d if g > 1 and n != g else 0
    mixed = (n + 2 * g) * d
    if sh.spec == "te":
        inner = a * (q_copy + mixed + n * d) + (0 if "core_attn" in _selective(sh.cfg) else lse)
        return norm_bytes(sh) + inner
    if "core_attn" in _selective(sh.cfg):
        inner = a * (q_copy + mixed + n * d)  # checkpoint inputs q, k, v; linear_proj's input
    else:
        kv_rep = 2 * n * d if n != g else 0
        held = mixed if (g == 1 or n == g) else 0
        inner = a * (q_copy + held + kv_rep + n * d) + lse
    return norm_bytes(sh) + inner


def mlp_bytes(sh: Shape) -> float:
    inner = 0 if "mlp" in _selective(sh.cfg) else 2 * sh.a * sh.cfg.model.ffn_hidden_size
    return norm_bytes(sh) + inner / sh.tp


LAYER_BYTES = {MAMBA: mamba_bytes, ATTENTION: attention_bytes, MLP: mlp_bytes}


def layer_bytes_per_token(cfg: Config, spec: str) -> Dict[str, float]:
    """Saved bytes per token and TP rank of each layer type, with no full recompute."""
    sh = Shape(cfg, spec)
    return {char: fn(sh) for char, fn in LAYER_BYTES.items()}


def checkpointed_layers(cfg: Config, num_layers: int) -> tuple:
    """(layers whose activations are dropped, number of chunk inputs kept) in a stage."""
    rc = cfg.recompute
    if rc.granularity != "full":
        return 0, 0
    if rc.method == "uniform":
        return num_layers, math.ceil(num_layers / rc.num_layers)
    n = min(rc.num_layers, num_layers)
    return n, n


def stage_bytes_per_token(cfg: Config, spec: str, layers: str, first: bool, last: bool,
                          vocab_rows: Optional[int] = None) -> Dict[str, float]:
    """Saved bytes per token of one pipeline stage, by place: each layer type, the
    checkpointed chunk inputs (full recompute), the embedding and the head. `vocab_rows`:
    the output layer's rows on one TP rank (default: the vocabulary split over TP)."""
    sh = Shape(cfg, spec)
    per_type = layer_bytes_per_token(cfg, spec)
    dropped, chunks = checkpointed_layers(cfg, len(layers))
    # uniform drops every layer; block the first `dropped` layers of the stage.
    kept = layers[dropped:]
    out = {char: kept.count(char) * per_type[char] for char in LAYER_BYTES}
    out["chunk inputs"] = chunks * sh.a * cfg.model.hidden_size / sh.sp
    # Token ids (int64), and with TP the vocab-parallel embedding's out-of-range mask.
    out["embedding"] = (8.0 + (1 if sh.tp > 1 else 0)) if first else 0.0
    if vocab_rows is None:
        vocab_rows = math.ceil(cfg.model.vocab_size / sh.tp)
    # Final norm; cross entropy's fp32 exp-logits, target mask (bool) and masked target (int64).
    out["head"] = norm_bytes(Shape(_no_norm_recompute(cfg), spec)) + FP32 * vocab_rows + 9 if last else 0.0
    return out


def _no_norm_recompute(cfg: Config) -> Config:
    """The final norm is not a layer's pre-norm: selective `norm` does not recompute it."""
    if "norm" not in _selective(cfg):
        return cfg
    import copy

    other = copy.deepcopy(cfg)
    other.recompute.modules = [m for m in other.recompute.modules if m != "norm"]
    if not other.recompute.modules:
        other.recompute.granularity = "none"
    return other


def recompute_flops_per_token(cfg: Config, layer_flops: Dict[str, float], layers: str,
                              attention_core_flops: float, scan_flops: float) -> float:
    """Extra forward FLOPs per token that recomputation adds (hardware minus model FLOPs),
    over the given layers. Full recompute repeats the dropped layers' forward; selective
    repeats the core attention (QK^T, AV), the MLP or the SSD scan."""
    rc = cfg.recompute
    if rc.granularity == "full":
        dropped, _ = checkpointed_layers(cfg, len(layers))
        return sum(layer_flops[c] for c in layers[:dropped])
    extra = 0.0
    for module in _selective(cfg):
        if module == "core_attn":
            extra += layers.count(ATTENTION) * attention_core_flops
        elif module == "mlp":
            extra += layers.count(MLP) * layer_flops[MLP]
        elif module == "mamba":
            extra += layers.count(MAMBA) * scan_flops
    return extra
