"""Typed configuration: one dataclass per component.

Every YAML key maps to a field here; the loader rejects anything else. Defaults are the
Nemotron-H pretraining defaults where the paper gives one, else a safe choice for the
CPU smoke model.

A field with a fixed set of values is typed `Literal[...]`: that annotation is the one list
of allowed values. The loader refuses anything else (naming the values), and validation,
FP8 checks and ablation arms read the values back with `choices(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple, get_args

Spec = Literal["auto", "te", "local"]
ParamsDtype = Literal["fp32", "bf16"]
FP8Format = Literal["hybrid", "e4m3"]
FP8RecipeName = Literal["tensorwise", "delayed", "mxfp8", "blockwise"]
AmaxComputeAlgo = Literal["max", "most_recent"]
FP8Backend = Literal["auto", "te", "emulated", "scaled_mm"]
DataSource = Literal["blend", "bundled", "mock"]
# Tokenizers without a file, and those that take one as `KIND:FILE` (or `type: KIND` + `path`).
PlainTokenizer = Literal["byte", "bundled"]
FileTokenizer = Literal["hf", "tiktoken", "sentencepiece"]
OptimizerName = Literal["adam", "sgd"]
SchedulerType = Literal["cosine", "wsd", "constant"]
WSDDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]
WandbMode = Literal["offline", "online", "disabled"]
# megatron-core's RerunStateMachine modes (report_stats = its report_determinism_stats).
RerunModeName = Literal["disabled", "validate_results", "report_stats"]
RerunInjectionType = Literal["correct_result", "transient_error", "persistent_error"]
BadStepAction = Literal["stop", "skip"]
SpikeAction = Literal["report", "bad_step"]
# Drill faults of `resilience.inject` (KIND@STEP:RANK).
InjectKind = Literal["nan_loss", "inf_loss", "spike_loss", "nan_grad", "inf_grad"]
CrossEntropyFusionImpl = Literal["native", "te"]
TPCommBootstrapBackend = Literal["nccl", "mpi", "gloo"]
CudaGraphImpl = Literal["none", "local", "transformer_engine"]
CudaGraphScope = Literal["attn", "mlp", "mamba", "full_iteration"]
RecomputeGranularity = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
RecomputeModule = Literal["core_attn", "mlp", "mamba", "norm"]


def choices(literal) -> Tuple[str, ...]:
    """The allowed values of a `Literal` type, in declaration order."""
    return tuple(get_args(literal))


@dataclass
class RunConfig:
    name: str = "run"
    # Everything a run writes (resolved config, metrics, checkpoints, logs) goes here.
    output_dir: str = "runs/default"


@dataclass
class ModelConfig:
    name: str = "nemotron-h"
    # Hybrid layer pattern: M = Mamba-2, * = attention, - = MLP, | = pipeline-stage boundary.
    pattern: str = "M*-"
    num_layers: int = 3
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int = 2  # KV heads (GQA)
    kv_channels: int = 16  # attention head dim
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_state_dim: int = 16
    mamba_num_groups: int = 2
    conv_kernel: int = 4
    chunk_size: int = 128
    vocab_size: int = 131072
    # The model holds vocab_size rounded up to a multiple of this x parallel.tp rows (as
    # Megatron's --make-vocab-size-divisible-by); exports keep the true vocab_size.
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 8192
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    # Implementation of the layers: te (TransformerEngine + mamba-ssm), local (pure torch), auto.
    spec: Spec = "auto"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sp: bool = False  # sequence parallelism (needs tp > 1)
    cp: int = 1  # context parallelism (validated; only cp=1 is implemented)


@dataclass
class FP8Config:
    enabled: bool = False
    format: FP8Format = "hybrid"  # hybrid: E4M3 forward, E5M2 backward
    recipe: FP8RecipeName = "tensorwise"
    amax_history_len: int = 1024
    amax_compute_algo: AmaxComputeAlgo = "max"
    margin: int = 0
    # Nemotron-H keeps the first and last N hybrid layers in BF16.
    first_last_layers_bf16: int = 0
    fp8_param_gather: bool = False
    backend: FP8Backend = "auto"


@dataclass
class PrecisionConfig:
    params_dtype: ParamsDtype = "fp32"
    grad_reduce_in_fp32: bool = True
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class RecomputeConfig:
    """Activation recomputation, with Megatron's names. `full` keeps only the input of each
    recomputed chunk of layers; `selective` recomputes the listed pieces inside the layers."""

    granularity: RecomputeGranularity = "none"
    # full: uniform = chunks of num_layers layers; block = the first num_layers layers of
    # each pipeline stage (the rest keep their activations).
    method: RecomputeMethod = "uniform"
    num_layers: int = 1
    # selective: core_attn (attention softmax/context), mlp (the whole dense MLP from its
    # input), mamba (conv, SSD scan and gated norm from the in_proj output), norm (pre-norms).
    modules: List[RecomputeModule] = field(default_factory=list)


@dataclass
class PerformanceConfig:
    """Speed settings with megatron-core's names (docs/performance.md). A `None` is decided by
    the resolver: on where this platform supports it (CUDA, TE layers), off on CPU. Forcing a
    GPU-only one on where it cannot run is a configuration error."""

    # Data-parallel gradient reduce-scatter/all-reduce during backward, bucket by bucket.
    overlap_grad_reduce: Optional[bool] = None
    # Distributed-optimizer parameter all-gather during the next forward.
    overlap_param_gather: Optional[bool] = None
    bucket_size: Optional[int] = None  # elements per DDP bucket; None: megatron-core's default
    average_in_collective: bool = False
    gradient_accumulation_fusion: Optional[bool] = None  # GPU only (TE / apex)
    persist_layer_norm: Optional[bool] = None  # GPU only
    masked_softmax_fusion: Optional[bool] = None  # GPU only
    cross_entropy_loss_fusion: Optional[bool] = None
    cross_entropy_fusion_impl: CrossEntropyFusionImpl = "native"  # te: GPU only
    tp_comm_overlap: Optional[bool] = None  # TE userbuffers; GPU only, needs parallel.sp
    tp_comm_bootstrap_backend: TPCommBootstrapBackend = "nccl"
    cuda_graph_impl: CudaGraphImpl = "none"  # GPU only when not none
    cuda_graph_scope: List[CudaGraphScope] = field(default_factory=list)  # empty: whole layers
    cuda_graph_warmup_steps: int = 3
    # Python's cyclic GC off, run every `manual_gc_interval` steps on every rank at once
    # (stray collections on one rank stall the others at the next collective).
    manual_gc: bool = False
    manual_gc_interval: int = 0
    # megatron-core's jit_fuser (torch.compile); None: on CUDA, off on CPU where compiling
    # costs ~20 s per process for nothing.
    torch_compile: Optional[bool] = None


@dataclass
class BlendEntry:
    path: str = ""  # prefix of a .bin/.idx pair
    weight: float = 1.0


@dataclass
class TokenizerConfig:
    # byte | hf:FILE | tiktoken:FILE | sentencepiece:FILE | bundled (the BPE shipped with the corpus)
    type: str = "byte"
    path: Optional[str] = None
    # Split pattern for tiktoken ranks files: v1 | v2 | cl100k | gpt2 | a regex (default v2).
    tiktoken_pattern: Optional[str] = None


@dataclass
class DataConfig:
    # "bundled" tokenises the corpus shipped in the package on first use; "mock" makes random tokens.
    source: DataSource = "blend"
    blend: List[BlendEntry] = field(default_factory=list)
    split: str = "99,1,0"
    train_blend: List[BlendEntry] = field(default_factory=list)
    valid_blend: List[BlendEntry] = field(default_factory=list)
    test_blend: List[BlendEntry] = field(default_factory=list)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    cache_dir: Optional[str] = None  # index cache; default <run.output_dir>/data_cache
    num_workers: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class OptimizerConfig:
    name: OptimizerName = "adam"  # adam: AdamW semantics (decoupled weight decay)
    lr: float = 3e-4
    min_lr: float = 3e-6
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


@dataclass
class SchedulerConfig:
    type: SchedulerType = "cosine"
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # default: train.steps
    wsd_decay_steps: Optional[int] = None  # length of the final decay phase of WSD
    wsd_decay_style: WSDDecayStyle = "linear"
    # Batch-size ramp: [start_global_batch, increment, ramp_samples]; empty = off.
    rampup_batch_size: List[int] = field(default_factory=list)
    # On resume, a schedule that differs from the checkpoint's (e.g. more train.steps) follows
    # the config and the change is printed; true keeps the checkpoint's schedule instead.
    use_checkpoint_schedule: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 8192
    deterministic: bool = False
    log_interval: int = 1
    eval_interval: int = 0  # 0 = only at the end
    eval_iters: int = 2
    exit_duration_minutes: Optional[float] = None
    # Stop (checkpoint, exit 75) after every multiple of this many steps, as Megatron's
    # --exit-interval: a cut at the same step on any machine. null = no such stop.
    exit_interval: Optional[int] = None
    exit_signal: str = "SIGTERM"  # also handled: SIGUSR1 from `#SBATCH --signal=B:USR1@120`


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0 = only at the end
    dir: Optional[str] = None  # default <run.output_dir>/checkpoints
    keep_last: int = 3
    async_save: bool = False
    resume: bool = True  # resume from the latest complete checkpoint if one exists
    load: Optional[str] = None  # start from another run's checkpoint directory
    save_at_end: bool = True
    # Frequent, throwaway checkpoints (e.g. for preemptible jobs): every N steps (0 = off) into
    # non_persistent_dir (default <run.output_dir>/checkpoints_non_persistent). Only the newest
    # is kept and they never count in keep_last; resume takes the newest complete checkpoint
    # among both directories.
    non_persistent_interval: int = 0
    non_persistent_dir: Optional[str] = None


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "nemotron-train"
    entity: Optional[str] = None
    mode: WandbMode = "offline"
    group: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    progress_bar: bool = True


@dataclass
class LaunchConfig:
    nproc_per_node: int = 1
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # Multi-node without SLURM: this node's index (0 = the node at master_addr); torchrun
    # meets the other nodes at a c10d rendezvous on master_addr:master_port.
    node_rank: int = 0
    # The network interface ranks talk over (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), e.g.
    # ib0 or eth1; null = the libraries' own choice. On SLURM the rendezvous address is the
    # first node's address on it.
    socket_ifname: Optional[str] = None
    # torchrun restarts the local ranks up to this many times after a rank fails; the new
    # ranks resume from the latest checkpoint (in-job restart). 0 = a failure ends the job.
    max_restarts: int = 0


@dataclass
class ResilienceConfig:
    """Numerical checks of every step, hang and straggler detection (docs/reliability.md)."""

    # NaN/Inf of each rank's local loss, before the data-parallel reduction.
    check_nan_in_loss: bool = True
    # A local loss >= spike_factor x the largest of the first `spike_window` losses is a
    # spike (megatron-core's is_unexpectedly_large; Megatron-LM uses 10 and 100). 0 = off.
    spike_factor: float = 10.0
    spike_window: int = 100
    spike_action: SpikeAction = "report"
    # megatron-core's DDP check for unexpectedly large local gradient norms (reported).
    check_large_grads: bool = False
    # megatron-core's RerunStateMachine: validate_results re-runs a failed step in place to
    # tell a transient fault from a reproducible one; report_stats re-runs every step once
    # and reports the spread (determinism statistics).
    rerun_mode: RerunModeName = "disabled"
    error_injection_rate: int = 0  # megatron-core's drill: ~1 rejected result per N checks
    error_injection_type: RerunInjectionType = "transient_error"
    # A failed NaN/Inf check: stop (exit, nothing saved from the bad step) or skip (the update
    # is dropped, the batch is consumed) and stop after max_skipped_steps in a row.
    on_bad_step: BadStepAction = "stop"
    max_skipped_steps: int = 3
    # Steps whose batch is consumed without an update (Megatron's --iterations-to-skip).
    skip_steps: List[int] = field(default_factory=list)
    # Drill faults, comma-separated KIND@STEP:RANK, e.g. "nan_loss@5:1,nan_grad@9:0".
    inject: str = ""
    # A rank without progress for this long is reported stuck: every rank's stack is dumped
    # into <run.output_dir>/stacks/ and the job fails. 0 = off.
    hang_timeout_s: float = 600.0
    # torch.distributed collective timeout; the hang watchdog should fire before it.
    collective_timeout_minutes: float = 30.0
    # Warn when the slowest rank's step time is above this multiple of the fastest's.
    straggler_warn_ratio: float = 1.5


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
