"""Model construction: our config -> mcore TransformerConfig -> MambaModel with our stack spec."""

from __future__ import annotations

import torch
from megatron.core.activations import squared_relu
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from nemotron_train.config.pattern import layer_types
from nemotron_train.config.schema import Config
from nemotron_train.distributed.groups import amax_reduction_group
from nemotron_train.fp8 import layer_fp8_context
from nemotron_train.models.engine_config import init_tp_comm_overlap, performance_transformer_kwargs
from nemotron_train.models.recompute import fix_checkpoint_without_output, mcore_recompute_kwargs
from nemotron_train.models.specs import local_stack_spec, te_stack_spec
from nemotron_train.models.vocab import padded_vocab_size
from nemotron_train.resolve import ResolvedRun

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(run: ResolvedRun) -> TransformerConfig:
    """mcore's config for our model (its fields: `transformer_kwargs`)."""
    return TransformerConfig(**transformer_kwargs(run))


def transformer_kwargs(run: ResolvedRun) -> dict:
    """The TransformerConfig fields of a resolved run; FP8 fields are set only for the TE
    backend. `plan --engine` prints exactly these (models/engine_config.py)."""
    cfg = run.cfg
    m, p = cfg.model, cfg.parallel
    dtype = DTYPES[cfg.precision.params_dtype]
    on_cpu = run.device_type == "cpu"
    rc = cfg.recompute
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        mamba_num_heads=m.mamba_num_heads,
        mamba_head_dim=m.mamba_head_dim,
        mamba_state_dim=m.mamba_state_dim,
        mamba_num_groups=m.mamba_num_groups,
        is_hybrid_model=True,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        activation_func=squared_relu,
        gated_linear_unit=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # On CPU, initialise the full weight once and slice it per TP rank: the same seed gives
        # the same model for every TP size, which is what layout-equivalence tests rely on.
        use_cpu_initialization=on_cpu,
        # No linear biases and no rotary embedding: these fusions have nothing to fuse.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        # Fusions, TP overlap, CUDA graphs: performance.*, as resolved for this platform.
        **performance_transformer_kwargs(run),
        deterministic_mode=cfg.train.deterministic,
        **_te_fp8_kwargs(cfg, run.fp8_backend),
        **mcore_recompute_kwargs(rc.granularity, rc.method, rc.num_layers, rc.modules, run.spec),
    )


def _te_fp8_kwargs(cfg: Config, backend) -> dict:
    """FP8 through TE is configured on TransformerConfig; the emulated backend ignores it."""
    fp8 = cfg.precision.fp8
    if backend != "te":
        return {}
    n = fp8.first_last_layers_bf16
    return dict(
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_amax_history_len=fp8.amax_history_len,
        fp8_amax_compute_algo=fp8.amax_compute_algo,
        fp8_margin=fp8.margin,
        fp8_param=fp8.fp8_param_gather,
        first_last_layers_bf16=n > 0,
        num_layers_at_start_in_bf16=n,
        num_layers_at_end_in_bf16=n,
    )


def mamba_mixer_params(cfg: Config) -> dict:
    """The Mamba mixer's constructor arguments that come from `model.*` (not TransformerConfig fields)."""
    return {"d_conv": cfg.model.conv_kernel, "chunk_size": cfg.model.chunk_size}


def build_model(run: ResolvedRun, pg_collection: ProcessGroupCollection) -> MambaModel:
    """Build this rank's pipeline stage of the model with the resolved spec and FP8 backend."""
    cfg, backend = run.cfg, run.fp8_backend
    init_tp_comm_overlap(run)  # TE's userbuffers exist before the first TE layer is built
    config = transformer_config(run)
    # Per-layer FP8 context by global layer index (null contexts when FP8 is off).
    layer_context = layer_fp8_context(cfg, backend, amax_reduction_group(pg_collection))
    mixer_params = mamba_mixer_params(cfg)
    selective = cfg.recompute.modules if cfg.recompute.granularity == "selective" else ()
    fix_checkpoint_without_output()
    if run.spec == "te":
        stack_spec = te_stack_spec(layer_context, mixer_params=mixer_params, recompute_modules=selective)
    else:
        stack_spec = local_stack_spec(
            backend in ("emulated", "scaled_mm"), layer_context, init_seed=cfg.train.seed, mixer_params=mixer_params,
            recompute_modules=selective,
        )
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    layer_types(cfg.model.pattern)  # raises a clear error on a bad pattern
    model = MambaModel(
        config=config,
        mamba_stack_spec=stack_spec,
        vocab_size=padded_vocab_size(cfg.model, cfg.parallel.tp),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        hybrid_override_pattern=cfg.model.pattern,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
        position_embedding_type="none",
        pg_collection=pg_collection,
    )
    if config.use_cpu_initialization:
        _reinit_vocab_weights(model, cfg, pg_collection)
    if run.device_type == "cuda":
        model.cuda(torch.cuda.current_device())
    return model


def _reinit_vocab_weights(model: MambaModel, cfg: Config, pgs: ProcessGroupCollection) -> None:
    """Embedding and output weights from their own seeds, so they do not depend on which
    other modules this pipeline stage built before them (CPU initialisation only)."""
    tp_rank, tp_size = pgs.tp.rank(), pgs.tp.size()
    targets = []
    if model.pre_process:
        targets.append((model.embedding.word_embeddings.weight, 1))
    if model.post_process and model.output_layer.weight is not None:
        targets.append((model.output_layer.weight, 2))
    for weight, tag in targets:
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + 1_000_000 + tag)
        rows = weight.shape[0]  # vocab rows of this TP rank (vocab is padded to a TP multiple)
        full = torch.empty(rows * tp_size, weight.shape[1]).normal_(0.0, cfg.model.init_method_std, generator=g)
        with torch.no_grad():
            weight.copy_(full[tp_rank * rows : (tp_rank + 1) * rows].to(weight.dtype))
