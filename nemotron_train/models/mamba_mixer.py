"""Pure-torch Mamba-2 mixer, a drop-in for megatron-core 0.16.1's `MambaMixer`.

mcore's mixer needs mamba_ssm/causal_conv1d (CUDA + Triton). This one has the same
constructor, parameter names, shapes, init, tensor-parallel layout and sharded state dict,
so checkpoints move freely between the two, but computes with `ssd.py`'s torch kernels.
It is training-only: no decode/prefill caches.

Tensor-parallel layout (as mcore's): `in_proj` is a column-parallel linear whose local
rows on each rank are that rank's [z, x, B, C, dt] slices packed back to back; the
checkpoint splits them into `in_proj.weight.{z,x,B,C,dt}`, each sharded on its own, so a
checkpoint can be reloaded with another TP size. `conv1d` ([x, B, C] channels), `dt_bias`,
`A_log`, `D` and `norm.weight` hold this rank's heads/groups only.

Shape-suffix legend: L sequence, B batch, D channels, H heads, P head dim, G groups,
N state dim (see ssd.py). Activations arrive and leave as [L, B, D] like mcore's.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ReplicaId, ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import deprecate_inference_params

from nemotron_train.models.recompute import checkpoint_ssm
from nemotron_train.models.ssd import causal_conv1d, gated_rms_norm, ssd_chunked

try:  # Same class as mcore's when its mixer module imports (it needs Triton).
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
except ImportError:

    @dataclass
    class MambaMixerSubmodules:
        """Module specs for the input and output projections (mirrors mcore's)."""

        in_proj: Union[ModuleSpec, type] = None
        out_proj: Union[ModuleSpec, type] = None


__all__ = ["TorchMambaMixer", "MambaMixerSubmodules", "GatedRMSNorm"]


def _param_device() -> torch.device:
    # mcore puts these parameters on the current GPU; without one they live on the CPU.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _tp_rng_fork():
    """mcore draws per-rank parameters inside the model-parallel RNG fork so TP ranks get
    different values. Use it whenever it has been seeded; a bare unit test may not have."""
    tracker = get_cuda_rng_tracker()
    get_states = getattr(tracker, "get_states", None)
    seeded = get_states is None or _MODEL_PARALLEL_RNG_TRACKER_NAME in get_states()
    return tracker.fork() if seeded else contextlib.nullcontext()


class GatedRMSNorm(nn.Module):
    """mamba_ssm's `RMSNorm` (layernorm_gated) with mcore's TP-sharded checkpointing:
    norm(x * silu(z)) per group of `group_size` channels, then times `weight`."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False,
                 device=None, dtype=None, tp_group=None):
        super().__init__()
        if norm_before_gate:
            raise NotImplementedError("only norm_before_gate=False (Mamba-2's choice)")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.group_size, self.eps)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Weight sharded along axis 0 across TP (as mcore's ExtendedRMSNorm)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
            sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


class TorchMambaMixer(MegatronModule):
    """Mamba-2 mixer in plain torch; arguments exactly as mcore's `MambaMixer` (0.16.1).

    `d_state`, `headdim`, `ngroups` and `use_mem_eff_path` are deprecated there in favour of
    `config.mamba_state_dim`, `mamba_head_dim`, `mamba_num_groups`; the same here. There is
    one code path, so `use_mamba_mem_eff_path` changes nothing.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MambaMixerSubmodules,
        d_model,
        d_conv=4,
        conv_init=None,
        expand=2,
        A_init_range=(1, 16),
        D_has_hdim=False,
        rmsnorm=True,
        norm_before_gate=False,
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        bias=False,
        conv_bias=True,
        chunk_size=128,
        layer_number=None,
        use_mem_eff_path=None,
        d_state=None,
        headdim=None,
        ngroups=None,
        pg_collection: ProcessGroupCollection = None,
        pp_layer_offset: int = 0,
        recompute_ssm: bool = False,
    ):
        super().__init__(config)
        # Selective recompute (`recompute.modules: [mamba]`): keep only in_proj's output.
        self.recompute_ssm = recompute_ssm
        self.config = config
        self.d_model = d_model
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.chunk_size = chunk_size
        self.layer_number = layer_number
        self.pp_layer_offset = pp_layer_offset
        self.cached_batch_size = None
        assert pg_collection is not None, "pg_collection must be provided for MambaMixer"
        self.pg_collection = pg_collection
        for name, value in (("use_mem_eff_path", use_mem_eff_path), ("d_state", d_state),
                            ("headdim", headdim), ("ngroups", ngroups)):
            if value is not None:
                warnings.warn(f"The {name!r} argument is deprecated; the value from the "
                              "TransformerConfig is used instead.", DeprecationWarning)
        self._set_dims()
        assert not bias
        assert not self.norm_before_gate

        self.in_proj = self._build_in_proj(submodules, bias)
        self._init_local_params(d_conv, conv_bias, A_init_range, dt_min, dt_max, dt_init_floor)
        self.activation = "silu"
        self.act = nn.SiLU()
        if self.rmsnorm:
            self.norm = GatedRMSNorm(
                self.d_inner_local_tp,
                eps=1e-5,
                group_size=self.d_inner_local_tp // self.ngroups_local_tp,
                norm_before_gate=self.norm_before_gate,
                device=_param_device(),
                dtype=config.params_dtype,
                tp_group=self.pg_collection.tp,
            )
            setattr(self.norm.weight, "tensor_model_parallel", True)
        self.out_proj = self._build_out_proj(submodules, bias)
        if config.use_cpu_initialization and config.perform_initialization:
            self._init_tp_invariant(A_init_range, dt_min, dt_max, dt_init_floor)
        # Reused as is: head-sharding all-to-alls for context parallelism (no-ops at cp=1).
        self.cp = MambaContextParallel(
            cp_group=self.pg_collection.cp,
            d_inner_local_tp=self.d_inner_local_tp,
            nheads_local_tp=self.nheads_local_tp,
            ngroups_local_tp=self.ngroups_local_tp,
            d_state=self.d_state,
            conv1d_cp1=self.conv1d,
            dt_bias_cp1=self.dt_bias,
            A_log_cp1=self.A_log,
            D_cp1=self.D,
            D_has_hdim=self.D_has_hdim,
        )
        self.tp_group = pg_collection.tp

    def _build_in_proj(self, submodules, bias):
        # Under sequence parallelism it all-gathers the sequence-sharded input.
        return build_module(
            submodules.in_proj,
            self.d_model,
            self.d_inner * 2 + 2 * self.ngroups * self.d_state + self.nheads,  # z x B C dt
            config=self.config,
            init_method=self.config.init_method,
            gather_output=False,
            bias=bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.pg_collection.tp,
        )

    def _build_out_proj(self, submodules, bias):
        # Input partitioned along d_inner; under sequence parallelism the output is
        # reduce-scattered along the sequence.
        return build_module(
            submodules.out_proj,
            self.d_inner,
            self.d_model,
            config=self.config,
            init_method=self.config.output_layer_init_method,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.pg_collection.tp,
        )

    def _set_dims(self) -> None:
        """Global and per-TP-rank sizes, with mcore's divisibility checks."""
        config = self.config
        self.use_mem_eff_path = config.use_mamba_mem_eff_path
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        assert self.d_state is not None and self.d_state > 0
        assert self.headdim is not None and self.headdim > 0
        assert self.ngroups is not None and self.ngroups > 0
        if config.mamba_num_heads is not None:
            self.nheads = config.mamba_num_heads
            assert self.nheads > 0
            self.d_inner = self.nheads * self.headdim
        else:
            assert self.d_inner % self.headdim == 0, "d_inner must be evenly divisible by headdim"
            self.nheads = self.d_inner // self.headdim
        if config.fp8:
            assert (2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads) % 16 == 0, (
                "For FP8, the in_proj output size must be a multiple of 16."
            )
        tp_size = self.pg_collection.tp.size()
        assert self.nheads % tp_size == 0, "nheads must be evenly divisble by tp_size"
        assert self.ngroups % tp_size == 0, "ngroups must be evenly divisible by tp_size"
        assert self.nheads % self.ngroups == 0, "nheads must be evenly divisible by ngroups"
        self.nheads_local_tp = self.nheads // tp_size
        self.d_inner_local_tp = self.d_inner // tp_size
        self.ngroups_local_tp = self.ngroups // tp_size

    def _init_local_params(self, d_conv, conv_bias, A_init_range, dt_min, dt_max, dt_init_floor):
        """conv1d, dt_bias, A_log, D: this rank's slice, initialised exactly as mcore does."""
        config = self.config
        device = _param_device()
        conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state  # x B C
        with _tp_rng_fork():
            # weight [conv_dim, 1, d_conv], bias [conv_dim]
            self.conv1d = nn.Conv1d(
                in_channels=conv_dim, out_channels=conv_dim, bias=conv_bias,
                kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                device=device, dtype=config.params_dtype,
            )
            setattr(self.conv1d.weight, "tensor_model_parallel", True)
            if self.conv1d.bias is not None:
                setattr(self.conv1d.bias, "tensor_model_parallel", True)
            if config.perform_initialization:
                if self.conv_init is not None:
                    nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
                else:
                    nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))

        with _tp_rng_fork():
            # dt_bias such that softplus(dt_bias) is log-uniform in [dt_min, dt_max].
            dt = torch.exp(
                torch.rand(self.nheads_local_tp, device=device, dtype=config.params_dtype)
                * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
            self.dt_bias = nn.Parameter(inv_dt)
            setattr(self.dt_bias, "tensor_model_parallel", True)

            assert A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]
            # mcore leaves A uninitialised (torch.empty) without perform_initialization; ones
            # keep the log finite and deterministic until a checkpoint overwrites it.
            A = torch.ones(self.nheads_local_tp, dtype=torch.float32, device=device)
            if config.perform_initialization:
                A = A.uniform_(*A_init_range)
            self.A_log = nn.Parameter(torch.log(A))  # kept in fp32
            setattr(self.A_log, "tensor_model_parallel", True)

        d_size = self.d_inner_local_tp if self.D_has_hdim else self.nheads_local_tp
        self.D = nn.Parameter(torch.ones(d_size, device=device))  # kept in fp32
        setattr(self.D, "tensor_model_parallel", True)

    def _rank_rows(self, full: torch.Tensor, sections) -> torch.Tensor:
        """This TP rank's rows of each packed component of a full (TP=1) tensor."""
        rank, size = self.pg_collection.tp.rank(), self.pg_collection.tp.size()
        parts = torch.split(full, list(sections), dim=0)
        return torch.cat([p.chunk(size, dim=0)[rank] for p in parts], dim=0)

    @torch.no_grad()
    def _init_tp_invariant(self, A_init_range, dt_min, dt_max, dt_init_floor) -> None:
        """With CPU initialisation, draw every parameter at its full (TP=1) size and keep
        this rank's slice, component by component, so any TP size starts from the same
        model. mcore's per-rank draws (and its contiguous split of the packed in_proj)
        would give each TP size a different model."""
        GN, H, d_inner = self.ngroups * self.d_state, self.nheads, self.d_inner
        dtype = self.config.params_dtype
        w_in = torch.empty(2 * d_inner + 2 * GN + H, self.d_model, dtype=torch.float32)
        self.config.init_method(w_in)
        self.in_proj.weight.copy_(self._rank_rows(w_in, [d_inner, d_inner, GN, GN, H]).to(dtype))
        conv = nn.Conv1d(d_inner + 2 * GN, d_inner + 2 * GN, self.d_conv, groups=d_inner + 2 * GN, bias=self.conv1d.bias is not None)
        if self.conv_init is not None:
            nn.init.uniform_(conv.weight, -self.conv_init, self.conv_init)
        self.conv1d.weight.copy_(self._rank_rows(conv.weight, [d_inner, GN, GN]).to(dtype))
        if conv.bias is not None:
            self.conv1d.bias.copy_(self._rank_rows(conv.bias, [d_inner, GN, GN]).to(dtype))
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias.copy_(self._rank_rows(dt + torch.log(-torch.expm1(-dt)), [H]).to(self.dt_bias.dtype))
        A = torch.empty(H, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log.copy_(self._rank_rows(torch.log(A), [H]))

    def forward(
        self,
        hidden_states,
        inference_context=None,
        *,
        inference_params=None,
        packed_seq_params=None,
    ):
        """hidden_states: [L/tp if sequence parallel else L, B, d_model].

        Returns (out, out_bias) from out_proj, out shaped like hidden_states.
        """
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if inference_context is not None and not self.training:
            raise NotImplementedError("TorchMambaMixer is training-only: no inference caches")
        if packed_seq_params is not None:
            raise NotImplementedError("TorchMambaMixer does not support packed sequences yet")
        zxBCdt_LBD, _ = self.in_proj(hidden_states)
        zxBCdt_LBD = self.cp.pre_conv_ssm(zxBCdt_LBD)
        y_LBD = checkpoint_ssm(self._ssm, zxBCdt_LBD, self.recompute_ssm)
        return self.out_proj(y_LBD)

    def _ssm(self, zxBCdt_LBD: torch.Tensor) -> torch.Tensor:
        """Conv, SSD scan and gated norm for this rank's heads: [L, B, *] -> [L, B, d_inner]."""
        cp = self.cp
        d_inner, ngroups = cp.d_inner_local_tpcp, cp.ngroups_local_tpcp
        nheads, headdim, d_state = cp.nheads_local_tpcp, self.headdim, self.d_state
        z_LBD, xBC_LBD, dt_LBH = torch.split(
            zxBCdt_LBD, [d_inner, d_inner + 2 * ngroups * d_state, nheads], dim=-1
        )
        # Only the conv wants channels-first [B, D, L]; z and the scan stay sequence-first.
        xBC_BDL = causal_conv1d(
            _SeqToChannels.apply(xBC_LBD),
            cp.get_conv1d_weight().squeeze(1),
            cp.get_conv1d_bias(),
            activation=self.activation,
        )
        x_LBD, B_LBD, C_LBD = torch.split(
            _ChannelsToSeq.apply(xBC_BDL), [d_inner, ngroups * d_state, ngroups * d_state], dim=-1
        )
        # dt and A in fp32 whatever the params dtype, as mamba_ssm's kernels do.
        dt_BLH = F.softplus(dt_LBH.float() + cp.get_dt_bias().float()).transpose(0, 1)
        A_H = -torch.exp(cp.get_A_log().float())
        D = cp.get_D().float()
        y_BLHP = ssd_chunked(
            x_LBD.transpose(0, 1).unflatten(-1, (nheads, headdim)),
            dt_BLH,
            A_H,
            B_LBD.transpose(0, 1).unflatten(-1, (ngroups, d_state)),
            C_LBD.transpose(0, 1).unflatten(-1, (ngroups, d_state)),
            self.chunk_size,
            D_H=D.view(nheads, headdim) if self.D_has_hdim else D,
            seq_major=True,
        )
        y_LBD = y_BLHP.transpose(0, 1).flatten(-2)  # a view: the scan wrote [L, B, H, P]
        if not self.rmsnorm:
            # mamba_ssm gates inside the scan, before the CP all-to-all.
            return cp.post_conv_ssm(y_LBD * F.silu(z_LBD))
        return self.norm(cp.post_conv_ssm(y_LBD), cp.post_conv_ssm(z_LBD))

    def mamba_state_shapes_per_request(self) -> Tuple[Tuple[int], Tuple[int]]:
        """Conv and SSM state shapes per request (what an inference cache would hold)."""
        conv_states_shape = (self.conv1d.weight.shape[0], self.d_conv)
        ssm_states_shape = (self.nheads_local_tp, self.headdim, self.d_state)
        return conv_states_shape, ssm_states_shape

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Same keys and sharding as mcore's MambaMixer: in_proj and conv1d are split into
        their components so each is TP-sharded on its own (reshardable across TP sizes)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded_sd = {}
        self._save_to_state_dict(sharded_sd, "", keep_vars=True)
        sharded_sd = make_sharded_tensors_for_checkpoint(
            sharded_sd, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )
        for name, module in self.named_children():
            if name == "conv1d":
                module_sd = make_sharded_tensors_for_checkpoint(
                    module.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.",
                    {"weight": 0, "bias": 0}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
                )
            else:
                module_sd = sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            sharded_sd.update(module_sd)

        d_inner, nh = self.d_inner_local_tp, self.nheads_local_tp
        gn = self.ngroups_local_tp * self.d_state
        key = f"{prefix}in_proj.weight"
        assert sharded_sd[key].data.size(0) == 2 * d_inner + 2 * gn + nh, sharded_sd[key]
        sharded_sd[key] = _split_tensor_factory(
            sharded_sd[key], [d_inner, d_inner, gn, gn, nh], ["z", "x", "B", "C", "dt"], 0
        )
        for name in ("conv1d.weight", "conv1d.bias"):
            key = f"{prefix}{name}"
            if key not in sharded_sd:  # conv_bias=False
                continue
            assert sharded_sd[key].data.size(0) == d_inner + 2 * gn, sharded_sd[key]
            sharded_sd[key] = _split_tensor_factory(
                sharded_sd[key], [d_inner, gn, gn], ["x", "B", "C"], 0
            )
        return sharded_sd


def _channels_first(t_LBD: torch.Tensor) -> torch.Tensor:
    return t_LBD.permute(1, 2, 0).contiguous()


def _seq_first(t_BDL: torch.Tensor) -> torch.Tensor:
    # As one 2-D transpose [B*D, L] -> [L, B*D]: PyTorch copies that in cache-friendly
    # blocks, several times faster than the equivalent 3-D permute copy.
    b, d, l = t_BDL.shape
    return t_BDL.reshape(b * d, l).t().contiguous().view(l, b, d)


class _SeqToChannels(torch.autograd.Function):
    """[L, B, D] -> contiguous [B, D, L], with the gradient made contiguous [L, B, D] by the
    fast 2-D transpose (autograd's would be a slow strided gather)."""

    @staticmethod
    def forward(ctx, t_LBD):
        return _channels_first(t_LBD)

    @staticmethod
    def backward(ctx, g_BDL):
        return _seq_first(g_BDL)


class _ChannelsToSeq(torch.autograd.Function):
    """Contiguous [B, D, L] -> contiguous [L, B, D], both ways by the fast 2-D transpose."""

    @staticmethod
    def forward(ctx, t_BDL):
        return _seq_first(t_BDL)

    @staticmethod
    def backward(ctx, g_LBD):
        l, b, d = g_LBD.shape
        return g_LBD.reshape(l, b * d).t().contiguous().view(b, d, l)


def _split_tensor_factory(
    orig_sh_ten: ShardedTensor, split_sections: List[int], split_names: List[str], split_dim: int
) -> ShardedTensorFactory:
    """Factory splitting a ShardedTensor into independently sharded chunks `key.name`.

    A copy of mcore's private helper (ssm/mamba_mixer.py), which cannot be imported here
    because that module needs Triton; the checkpoint format depends on it matching.
    """
    assert isinstance(orig_sh_ten, ShardedTensor), type(orig_sh_ten)
    assert not isinstance(split_sections, int), "split_sections must be a list of sizes"
    assert len(split_sections) == len(split_names), (split_sections, split_names)
    orig_sh_ten_no_data = orig_sh_ten.without_data()  # drop the `data` reference
    if sum(split_sections) != orig_sh_ten_no_data.local_shape[split_dim]:
        raise ValueError(
            f"Split sections must cover the whole dimension size, got {split_sections=} "
            f"vs dimension size {orig_sh_ten_no_data.local_shape[split_dim]}"
        )

    @torch.no_grad()
    def sh_ten_build_fn(
        key: str, t: torch.Tensor, replica_id: ReplicaId, flattened_range: Optional[slice]
    ):
        factory_sh_ten = replace(
            orig_sh_ten_no_data, key=key, data=t, dtype=t.dtype,
            replica_id=replica_id, flattened_range=flattened_range,
        )
        chunk_sh_tens = []
        split_start = 0
        for split_size, split_name in zip(split_sections, split_names):
            split_chunks = factory_sh_ten.narrow(split_dim, split_start, split_size)
            for sh_ten in split_chunks:
                sh_ten.key = f"{sh_ten.key}.{split_name}"
            chunk_sh_tens.extend(split_chunks)
            split_start += split_size
        assert sum(sh_ten.data.numel() for sh_ten in chunk_sh_tens) == t.numel()
        return chunk_sh_tens

    @torch.no_grad()
    def sh_ten_merge_fn(sub_state_dict):
        return torch.cat(sub_state_dict)

    return ShardedTensorFactory(
        orig_sh_ten.key, orig_sh_ten.data, sh_ten_build_fn, sh_ten_merge_fn, orig_sh_ten.replica_id
    )
