"""The hybrid layer stack: Mamba-2, attention and MLP layers from a pattern string.

A replacement for mcore 0.16's `MambaStack`, with the same constructor so `MambaModel` can
build it from a spec, and three fixes that matter for Nemotron-H:
- the final norm comes from the spec (MambaStack hard-codes TE's norm);
- pipeline stages follow `|` boundaries in the pattern, so uneven splits (118 layers over
  PP=4) work;
- every layer carries its *global* layer number, so sharded checkpoints name layers the
  same way whatever the PP size (MambaStack numbers attention/MLP layers per stage, which
  breaks resharding across PP).
It also carries out full activation recompute (`recompute.granularity: full`), which
MambaStack lacks: uniform chunks of layers or the first N layers of the stage run under
megatron-core's activation checkpoint (models/recompute.py).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import make_viewless_tensor
import torch
from torch import Tensor, nn

from nemotron_train.config.pattern import split_stages, stage_offset
from nemotron_train.models.recompute import checkpoint_chunk, recomputed_chunks

MAMBA, ATTENTION, MLP = "M", "*", "-"


@dataclass
class HybridStackSubmodules:
    mamba_layer: Union[ModuleSpec, type] = IdentityOp
    attention_layer: Union[ModuleSpec, type] = IdentityOp
    mlp_layer: Union[ModuleSpec, type] = IdentityOp
    final_norm: Union[ModuleSpec, type] = IdentityOp


def _no_layer_context(global_index: int):
    return nullcontext()


def _outer_context(layer_context):
    """The context around the whole stack's forward, when the layer contexts define one
    (fp8.runtime.LayerFP8Contexts); a plain per-layer function has none."""
    outer = getattr(layer_context, "outer", None)
    return outer() if outer is not None else nullcontext()


def _init_context(layer_context, global_index: int):
    """The context a layer is built in (TE FP8 weights), when the layer contexts define one."""
    init = getattr(layer_context, "init", None)
    return init(global_index) if init is not None else nullcontext()


def layer_init_rng(config: TransformerConfig, init_seed: Optional[int], global_number: int):
    """With CPU initialisation each layer draws from its own seed (run seed, global layer
    number), so a layer gets the same weights whatever the pipeline split or TP size.
    (On GPU, weights follow Megatron's per-rank RNG tracker.)"""
    if init_seed is None or not config.use_cpu_initialization:
        return nullcontext()
    return _seeded(init_seed * 1_000_003 + global_number)


@contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class HybridStack(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: HybridStackSubmodules,
        residual_in_fp32: bool = False,
        pre_process: bool = True,
        hybrid_attention_ratio: float = 0.0,
        hybrid_mlp_ratio: float = 0.0,
        hybrid_override_pattern: Optional[str] = None,
        post_layer_norm: bool = True,
        post_process: bool = True,
        device=None,
        dtype=None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        layer_context: Callable[[int], object] = _no_layer_context,
        init_seed: Optional[int] = None,
    ) -> None:
        super().__init__(config=config)
        assert pg_collection is not None, "HybridStack needs an explicit ProcessGroupCollection"
        assert hybrid_override_pattern, "HybridStack is driven by the layer pattern"
        self.pre_process = pre_process
        self.post_process = post_process
        self.post_layer_norm = post_layer_norm
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.input_tensor = None
        # Per-layer context (FP8 autocast or not), decided by global layer index.
        self.layer_context = layer_context

        pp_size, pp_rank = pg_collection.pp.size(), pg_collection.pp.rank()
        self.layer_types = split_stages(hybrid_override_pattern, pp_size)[pp_rank]
        self.layer_offset = stage_offset(hybrid_override_pattern, pp_size, pp_rank)
        # TransformerLayer adds mcore's even-split offset to the number it is given; undo it so
        # the final number is our global one.
        mcore_offset = get_transformer_layer_offset(config, None, pp_rank) if pp_size > 1 else 0

        self.layers = nn.ModuleList()
        for i, kind in enumerate(self.layer_types):
            global_number = self.layer_offset + i + 1
            with layer_init_rng(config, init_seed, global_number), _init_context(layer_context, global_number - 1):
                self.layers.append(self._build_layer(config, submodules, kind, global_number, mcore_offset, residual_in_fp32))

        if post_process and post_layer_norm:
            self.final_norm = build_module(
                submodules.final_norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )

    def _build_layer(self, config, submodules, kind: str, global_number: int, mcore_offset: int, residual_in_fp32: bool):
        if kind == MAMBA:
            return build_module(
                submodules.mamba_layer,
                config=config,
                residual_in_fp32=residual_in_fp32,
                layer_number=global_number,
                pp_layer_offset=self.layer_offset,
                pg_collection=self.pg_collection,
            )
        spec = submodules.attention_layer if kind == ATTENTION else submodules.mlp_layer
        layer = build_module(spec, config=config, layer_number=global_number - mcore_offset, pg_collection=self.pg_collection)
        assert layer.layer_number == global_number, (layer.layer_number, global_number)
        if isinstance(layer.mlp, IdentityOp):
            # Selective `mlp` recompute would checkpoint the attention layer's identity MLP,
            # keeping the layer output for nothing.
            layer.recompute_mlp = False
        return layer

    def set_input_tensor(self, input_tensor: Tensor) -> None:
        """Pipeline schedules hand a previous stage's output in here instead of via forward()."""
        self.input_tensor = input_tensor

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        inference_context=None,
        rotary_pos_emb: Optional[Tensor] = None,
        *,
        inference_params=None,
        packed_seq_params=None,
        padding_mask=None,
    ) -> Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor
        full = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        spans = recomputed_chunks(len(self.layers), self.config.recompute_method if full else None,
                                  self.config.recompute_num_layers)
        with _outer_context(self.layer_context):  # TE delayed scaling: one FP8 region per forward
            for start, stop, checkpointed in spans:
                run = partial(self._run_layers, start, stop, packed_seq_params)
                if checkpointed:
                    # Only the chunk's input is kept; its layers run again in backward.
                    hidden_states = checkpoint_chunk(self.config, self.tp_group, run, hidden_states, attention_mask, rotary_pos_emb)
                else:
                    hidden_states = run(hidden_states, attention_mask, rotary_pos_emb)
        if self.post_process and self.post_layer_norm:
            hidden_states = self.final_norm(hidden_states)
        # The pipeline schedule frees the output's storage after sending it; a view would
        # free its base too.
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)

    def _run_layers(self, start: int, stop: int, packed_seq_params, hidden_states: Tensor,
                    attention_mask: Optional[Tensor], rotary_pos_emb: Optional[Tensor]) -> Tensor:
        for layer in self.layers[start:stop]:
            with self.layer_context(layer.layer_number - 1):
                if isinstance(layer, TransformerLayer):
                    hidden_states, _ = layer(
                        hidden_states=hidden_states,
                        attention_mask=attention_mask,
                        rotary_pos_emb=rotary_pos_emb,
                        packed_seq_params=packed_seq_params,
                    )
                else:
                    hidden_states = layer(
                        hidden_states=hidden_states, attention_mask=attention_mask, packed_seq_params=packed_seq_params
                    )
        return hidden_states

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        sharded: ShardedStateDict = {}
        for local_idx, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local_idx}."
            layer_sd = layer.sharded_state_dict(local_prefix, [], metadata)
            # Checkpoint keys use the global layer index, so any PP split can read them.
            replace_prefix_for_sharding(layer_sd, local_prefix, f"{prefix}layers.{layer.layer_number - 1}.")
            sharded.update(layer_sd)
        for name, module in self.named_children():
            if module is not self.layers:
                sharded.update(
                    sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group)
                )
        return sharded
