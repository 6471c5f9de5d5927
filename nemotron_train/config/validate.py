"""Cross-field checks of a loaded config against the world size it will run on.

The loader guarantees types; this module guarantees the values fit together (parallel
sizes divide the model, batch sizes divide the data-parallel group, FP8 GEMM shapes are
aligned, ...). Every problem is a ConfigError naming the key(s), the value(s) and the fix,
raised before any process group is created or any weight is allocated.
"""

from __future__ import annotations

import math
import re
import signal
from typing import Iterable

from nemotron_train.config.schema import (
    AmaxComputeAlgo, Config, DataSource, FileTokenizer, FP8Backend, FP8Format, FP8RecipeName, ModelConfig,
    OptimizerName, ParamsDtype, PlainTokenizer, RecomputeGranularity, RecomputeMethod, RecomputeModule,
    SchedulerType, Spec, WandbMode, WSDDecayStyle, choices,
)
from nemotron_train import rundir
from nemotron_train.errors import ConfigError
from nemotron_train.config.pattern import layer_types, split_stages
from nemotron_train.config.resilience import check_resilience

# Allowed values come from the schema's Literal types (the single list of them).
TOKENIZER_PREFIXES = tuple(f"{kind}:" for kind in choices(FileTokenizer))
# Signals a process cannot handle, so they cannot be a graceful-stop request.
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
# FP8 GEMMs (TransformerEngine) need every GEMM dimension to be a multiple of 16.
FP8_ALIGNMENT = 16


def _choice(key: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; use one of: {', '.join(allowed)}")


def _at_least(key: str, value: float, minimum: float, why: str = "") -> None:
    if value < minimum:
        raise ConfigError(f"{key}={value!r} must be >= {minimum}{why}")


def mamba_d_inner(model: ModelConfig) -> int:
    """Mamba-2 inner width (heads x head dim); Nemotron-H uses 2 x hidden_size but any value works."""
    return model.mamba_num_heads * model.mamba_head_dim


def mamba_in_proj_width(model: ModelConfig) -> int:
    """Output width of the Mamba-2 in_proj: z and x (d_inner each), B and C (groups x state each), dt."""
    return 2 * mamba_d_inner(model) + 2 * model.mamba_num_groups * model.mamba_state_dim + model.mamba_num_heads


# --------------------------------------------------------------------------- model


def _check_model(cfg: Config) -> None:
    m = cfg.model
    types = layer_types(m.pattern)
    if len(types) != m.num_layers:
        raise ConfigError(
            f"model.pattern has {len(types)} layers but model.num_layers={m.num_layers}; "
            f"make them agree (set model.num_layers={len(types)} or fix the pattern)"
        )
    for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "conv_kernel",
                "chunk_size", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
        _at_least(f"model.{key}", getattr(m, key), 1)
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}; each KV group must serve a whole number "
            "of query heads, so choose num_query_groups that divides num_attention_heads"
        )
    if m.mamba_num_heads % m.mamba_num_groups:
        raise ConfigError(
            f"model.mamba_num_heads={m.mamba_num_heads} is not divisible by "
            f"model.mamba_num_groups={m.mamba_num_groups} (d_inner={mamba_d_inner(m)}); each B/C group "
            "must serve a whole number of heads, so choose mamba_num_groups that divides mamba_num_heads"
        )
    if m.norm_epsilon <= 0:
        raise ConfigError(f"model.norm_epsilon={m.norm_epsilon} must be > 0 (typically 1e-5)")
    if m.init_method_std <= 0:
        raise ConfigError(f"model.init_method_std={m.init_method_std} must be > 0 (typically 0.02)")
    _choice("model.spec", m.spec, choices(Spec))


# --------------------------------------------------------------------------- parallelism


def _check_parallel(cfg: Config, world_size: int) -> int:
    p, m = cfg.parallel, cfg.model
    _at_least("parallel.tp", p.tp, 1)
    _at_least("parallel.pp", p.pp, 1)
    _at_least("parallel.cp", p.cp, 1)
    if p.cp != 1:
        raise ConfigError(f"parallel.cp={p.cp}: only context parallelism cp=1 is implemented; set parallel.cp=1")
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1 (launch.nproc_per_node x launch.nnodes)")
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp x parallel.cp = "
            f"{p.tp} x {p.pp} x {p.cp} = {model_parallel}; use a multiple of {model_parallel} GPUs "
            "(launch.nproc_per_node x launch.nnodes) or change the parallel sizes"
        )
    for key in ("num_attention_heads", "num_query_groups", "mamba_num_heads", "mamba_num_groups", "ffn_hidden_size"):
        value = getattr(m, key)
        if value % p.tp:
            raise ConfigError(
                f"model.{key}={value} is not divisible by parallel.tp={p.tp}; tensor parallelism "
                f"shards it across ranks, so choose a parallel.tp that divides {value}"
            )
    if p.sp and p.tp == 1:
        raise ConfigError("parallel.sp=true requires parallel.tp > 1 (sequence parallelism shards over the TP group); "
                          "set parallel.sp=false or raise parallel.tp")
    split_stages(m.pattern, p.pp)
    return world_size // model_parallel


def _check_batch(cfg: Config, dp: int) -> None:
    t = cfg.train
    _at_least("train.micro_batch_size", t.micro_batch_size, 1)
    _at_least("train.global_batch_size", t.global_batch_size, 1)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}; use a multiple of {per_step}"
        )
    ramp = cfg.scheduler.rampup_batch_size
    if ramp:
        if len(ramp) != 3 or min(ramp) < 1:
            raise ConfigError(
                f"scheduler.rampup_batch_size={ramp} must be [start_global_batch, increment, ramp_samples] "
                "with positive values, or [] to disable the ramp"
            )
        start, increment, _ = ramp
        if start % per_step or increment % per_step:
            raise ConfigError(
                f"scheduler.rampup_batch_size={ramp}: start and increment must be multiples of "
                f"train.micro_batch_size x data-parallel size = {per_step}"
            )
        if start > t.global_batch_size:
            raise ConfigError(
                f"scheduler.rampup_batch_size start {start} exceeds train.global_batch_size={t.global_batch_size}"
            )


# --------------------------------------------------------------------------- precision


def _check_fp8_widths(cfg: Config) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    width = mamba_in_proj_width(m)
    if width % FP8_ALIGNMENT or (width // tp) % FP8_ALIGNMENT:
        raise ConfigError(
            f"precision.fp8.enabled=true needs GEMM widths divisible by {FP8_ALIGNMENT}, but the Mamba in_proj "
            f"width 2*d_inner + 2*mamba_num_groups*mamba_state_dim + mamba_num_heads = "
            f"2*{mamba_d_inner(m)} + 2*{m.mamba_num_groups}*{m.mamba_state_dim} + {m.mamba_num_heads} = {width} "
            f"is {width // tp} per TP rank (parallel.tp={tp}); make model.mamba_num_heads / parallel.tp a "
            f"multiple of {FP8_ALIGNMENT} (with head dim and state a multiple of 8), or set "
            "precision.fp8.enabled=false"
        )
    dims = {
        "model.hidden_size": m.hidden_size,
        "model.ffn_hidden_size / parallel.tp": m.ffn_hidden_size // tp,
        "model.num_attention_heads * model.kv_channels / parallel.tp": m.num_attention_heads * m.kv_channels // tp,
        "model.num_query_groups * model.kv_channels / parallel.tp": m.num_query_groups * m.kv_channels // tp,
        "Mamba d_inner (model.mamba_num_heads * model.mamba_head_dim) / parallel.tp": mamba_d_inner(m) // tp,
    }
    for name, value in dims.items():
        if value % FP8_ALIGNMENT:
            raise ConfigError(
                f"precision.fp8.enabled=true needs GEMM widths divisible by {FP8_ALIGNMENT}, but {name} = {value}; "
                "change the model/TP sizes or set precision.fp8.enabled=false"
            )


def _check_precision(cfg: Config) -> None:
    pr, fp8 = cfg.precision, cfg.precision.fp8
    _choice("precision.params_dtype", pr.params_dtype, choices(ParamsDtype))
    _choice("precision.fp8.format", fp8.format, choices(FP8Format))
    _choice("precision.fp8.recipe", fp8.recipe, choices(FP8RecipeName))
    _choice("precision.fp8.amax_compute_algo", fp8.amax_compute_algo, choices(AmaxComputeAlgo))
    _choice("precision.fp8.backend", fp8.backend, choices(FP8Backend))
    _at_least("precision.fp8.amax_history_len", fp8.amax_history_len, 1)
    _at_least("precision.fp8.first_last_layers_bf16", fp8.first_last_layers_bf16, 0)
    if 2 * fp8.first_last_layers_bf16 > cfg.model.num_layers:
        raise ConfigError(
            f"precision.fp8.first_last_layers_bf16={fp8.first_last_layers_bf16} keeps "
            f"{2 * fp8.first_last_layers_bf16} layers in BF16 but model.num_layers={cfg.model.num_layers}; "
            f"use at most {cfg.model.num_layers // 2}"
        )
    if fp8.enabled:
        _check_fp8_widths(cfg)


# --------------------------------------------------------------------------- optimisation and run


def _check_optimizer(cfg: Config) -> None:
    o, s = cfg.optimizer, cfg.scheduler
    _choice("optimizer.name", o.name, choices(OptimizerName))
    _at_least("optimizer.lr", o.lr, 0)
    _at_least("optimizer.min_lr", o.min_lr, 0)
    if o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} is larger than optimizer.lr={o.lr}; min_lr must be <= lr")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        if not 0 <= value < 1:
            raise ConfigError(f"optimizer.{key}={value} must be in [0, 1)")
    _at_least("optimizer.eps", o.eps, 0)
    _at_least("optimizer.weight_decay", o.weight_decay, 0)
    _at_least("optimizer.clip_grad", o.clip_grad, 0, " (0 disables clipping)")
    _choice("scheduler.type", s.type, choices(SchedulerType))
    _choice("scheduler.wsd_decay_style", s.wsd_decay_style, choices(WSDDecayStyle))
    _at_least("scheduler.warmup_steps", s.warmup_steps, 0)
    if s.decay_steps is not None:
        _at_least("scheduler.decay_steps", s.decay_steps, 1)
    decay = s.decay_steps if s.decay_steps is not None else cfg.train.steps
    if s.wsd_decay_steps is not None:
        _at_least("scheduler.wsd_decay_steps", s.wsd_decay_steps, 1, " (null: a tenth of the decay horizon)")
        if s.wsd_decay_steps > decay:
            raise ConfigError(
                f"scheduler.wsd_decay_steps={s.wsd_decay_steps} is longer than the decay horizon "
                f"(scheduler.decay_steps or train.steps = {decay}); shorten it"
            )


def _check_train(cfg: Config) -> None:
    t, c, m = cfg.train, cfg.checkpoint, cfg.model
    _at_least("train.steps", t.steps, 1)
    s = cfg.scheduler
    decay = s.decay_steps if s.decay_steps is not None else t.steps
    if s.warmup_steps > decay:
        raise ConfigError(
            f"scheduler.warmup_steps={s.warmup_steps} runs past the end of the schedule "
            f"(scheduler.decay_steps or train.steps = {decay}), so the LR would never reach optimizer.lr; "
            "shorten the warmup or lengthen the run"
        )
    _at_least("train.seq_length", t.seq_length, 1)
    if t.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
            "shorten the sequence or raise max_position_embeddings"
        )
    _at_least("train.log_interval", t.log_interval, 1, " (log every N steps)")
    _at_least("train.eval_interval", t.eval_interval, 0, " (0 = evaluate only at the end)")
    _at_least("train.eval_iters", t.eval_iters, 0)
    if t.exit_duration_minutes is not None and t.exit_duration_minutes <= 0:
        raise ConfigError(f"train.exit_duration_minutes={t.exit_duration_minutes} must be > 0, or null to disable")
    if t.exit_interval is not None and t.exit_interval <= 0:
        raise ConfigError(f"train.exit_interval={t.exit_interval} must be > 0 (stop at each multiple of it), or null to disable")
    if t.exit_signal not in signal.Signals.__members__:
        raise ConfigError(f"train.exit_signal={t.exit_signal!r} is not a signal name; use e.g. SIGTERM or SIGUSR1")
    if t.exit_signal in UNCATCHABLE_SIGNALS:
        raise ConfigError(
            f"train.exit_signal={t.exit_signal} cannot be caught, so it cannot ask for a clean stop; "
            "use e.g. SIGTERM or SIGUSR1"
        )
    if not cfg.run.output_dir.strip():
        raise ConfigError("run.output_dir is empty; name the directory the run writes to (e.g. runs/my-run)")
    _at_least("checkpoint.interval", c.interval, 0, " (0 = save only at the end)")
    _at_least("checkpoint.keep_last", c.keep_last, 1)
    _at_least("checkpoint.non_persistent_interval", c.non_persistent_interval, 0, " (0 = off)")
    if c.non_persistent_interval and rundir.non_persistent_checkpoint_dir(cfg.run.output_dir, c.non_persistent_dir) == rundir.checkpoint_dir(cfg.run.output_dir, c.dir):
        raise ConfigError(
            "checkpoint.non_persistent_dir is the persistent checkpoint directory; pick another one "
            "(only the newest non-persistent checkpoint is kept there)"
        )


def _check_split(split: str) -> None:
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) for p in parts) or min(parts) < 0 or sum(parts) <= 0:
        raise ConfigError(f"data.split={split!r} must be up to three non-negative weights like '99,1,0'")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _choice("data.source", d.source, choices(DataSource))
    if d.source == "blend":
        if not d.blend and not d.train_blend:
            raise ConfigError(
                "data.source=blend needs data.blend (split by data.split) or data.train_blend; "
                "list entries like {path: PREFIX, weight: 1.0}, or use data.source=mock or bundled"
            )
        if d.blend and d.train_blend:
            raise ConfigError("set either data.blend or data.train_blend/valid_blend/test_blend, not both")
        _check_split(d.split)
    for key in ("blend", "train_blend", "valid_blend", "test_blend"):
        for i, entry in enumerate(getattr(d, key)):
            if not entry.path:
                raise ConfigError(f"data.{key}[{i}].path is empty; give the prefix of a .bin/.idx pair")
            if entry.weight <= 0:
                raise ConfigError(f"data.{key}[{i}].weight={entry.weight} must be > 0")
    tok, tok_path = d.tokenizer.type, d.tokenizer.path
    with_file = tok.startswith(TOKENIZER_PREFIXES) and tok.split(":", 1)[1]
    # `type: hf` plus `path: FILE` is accepted as the spelled-out form of `type: hf:FILE`.
    with_path = tok + ":" in TOKENIZER_PREFIXES and bool(tok_path)
    if tok not in choices(PlainTokenizer) and not with_file and not with_path:
        raise ConfigError(
            f"data.tokenizer.type={tok!r} (data.tokenizer.path={tok_path!r}) is not supported; use byte, "
            "bundled, hf:FILE, tiktoken:FILE or sentencepiece:FILE"
        )
    _at_least("data.num_workers", d.num_workers, 0)


def _check_launch(cfg: Config) -> None:
    la = cfg.launch
    _at_least("launch.nproc_per_node", la.nproc_per_node, 1)
    _at_least("launch.nnodes", la.nnodes, 1)
    if not 1 <= la.master_port <= 65535:
        raise ConfigError(f"launch.master_port={la.master_port} must be in 1..65535")
    if not 0 <= la.node_rank < la.nnodes:
        raise ConfigError(f"launch.node_rank={la.node_rank} must be in 0..{la.nnodes - 1} (launch.nnodes={la.nnodes})")
    if la.socket_ifname is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", la.socket_ifname):
        raise ConfigError(f"launch.socket_ifname={la.socket_ifname!r} is not a network interface name (e.g. eth0, ib0)")
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, choices(WandbMode))


def _check_recompute(cfg: Config) -> None:
    rc = cfg.recompute
    _choice("recompute.granularity", rc.granularity, choices(RecomputeGranularity))
    _choice("recompute.method", rc.method, choices(RecomputeMethod))
    for module in rc.modules:
        _choice("recompute.modules", module, choices(RecomputeModule))
    if len(set(rc.modules)) != len(rc.modules):
        raise ConfigError(f"recompute.modules={rc.modules} lists a module twice; name each once")
    if rc.granularity == "selective" and not rc.modules:
        raise ConfigError(
            "recompute.granularity=selective needs recompute.modules, some of: " + ", ".join(choices(RecomputeModule))
        )
    if rc.granularity != "selective" and rc.modules:
        raise ConfigError(
            f"recompute.modules={rc.modules} is only used with recompute.granularity=selective "
            f"(it is {rc.granularity!r}); set the granularity or drop the modules"
        )
    if rc.granularity == "full":
        most = max(len(stage) for stage in split_stages(cfg.model.pattern, cfg.parallel.pp))
        if not 1 <= rc.num_layers <= most:
            raise ConfigError(
                f"recompute.num_layers={rc.num_layers} must be between 1 and the layers of the largest pipeline "
                f"stage ({most}) with recompute.granularity=full"
            )
        perf = cfg.performance
        if perf.cuda_graph_impl != "none" and list(perf.cuda_graph_scope) != ["full_iteration"]:
            raise ConfigError(
                f"recompute.granularity=full with performance.cuda_graph_impl={perf.cuda_graph_impl} and "
                f"performance.cuda_graph_scope={list(perf.cuda_graph_scope)}: megatron-core recomputes whole "
                "layers only under a full-iteration CUDA graph; set performance.cuda_graph_impl=none, "
                "performance.cuda_graph_scope=[full_iteration], or use recompute.granularity=selective"
            )


# --------------------------------------------------------------------------- entry point


def validate_config(cfg: Config, world_size: int) -> int:
    """Check cfg for a run on world_size ranks; returns the data-parallel size.

    Raises ConfigError for the first problem found.
    """
    _check_model(cfg)
    dp = _check_parallel(cfg, world_size)
    _check_recompute(cfg)
    _check_batch(cfg, dp)
    _check_precision(cfg)
    _check_optimizer(cfg)
    _check_train(cfg)
    _check_data(cfg)
    _check_launch(cfg)
    check_resilience(cfg, world_size)
    return dp
