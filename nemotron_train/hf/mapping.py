"""Mapping between our checkpoints and Hugging Face `NemotronHForCausalLM`.

Pure functions, no I/O and no transformers import:

- state dicts: our full (TP1, unsharded) model state dict <-> HF state dict;
- configs: our `ModelConfig` <-> the `config.json` dict of `NemotronHConfig`.

Both directions are exact: tensors are renamed, and only the attention QKV weight is
re-packed (rows moved, never recomputed), so HF -> ours -> HF gives bitwise-equal tensors.

Naming (layer i is the GLOBAL layer index in both):

    ours                                           HF
    embedding.word_embeddings.weight               model.embeddings.weight
    decoder.layers.i.norm.weight           (M)     model.layers.i.norm.weight
    decoder.layers.i.mixer.<p>             (M)     model.layers.i.mixer.<p>  (same <p>)
    decoder.layers.i.input_layernorm.weight (*)    model.layers.i.norm.weight
    decoder.layers.i.self_attention.linear_qkv     model.layers.i.mixer.{q,k,v}_proj
    decoder.layers.i.self_attention.linear_proj    model.layers.i.mixer.o_proj
    decoder.layers.i.pre_mlp_layernorm.weight (-)  model.layers.i.norm.weight
    decoder.layers.i.mlp.linear_fc1 / fc2          model.layers.i.mixer.up_proj / down_proj
    decoder.final_norm.weight                      model.norm_f.weight
    output_layer.weight                            lm_head.weight

Those are transformers' module names. On disk, NemotronH checkpoints (NVIDIA's and
transformers' `save_pretrained`) spell the `model.` prefix `backbone.`; `to_disk_names` and
`from_disk_names` convert, and import accepts either.

The Mamba in_proj rows are [z, x, B, C, dt] and conv1d channels [x, B, C] in both, so they
map one to one. megatron-core packs the fused QKV weight per query group: for each of the
`ng` KV groups, `np/ng` query heads then one key head then one value head, each `head_dim`
rows. HF keeps q, k and v separate with query head h in KV group h // (np/ng).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from nemotron_train.config.schema import ModelConfig
from nemotron_train.errors import HFConversionError
from nemotron_train.config.pattern import ATTENTION, MAMBA, MLP, layer_types

HF_MODEL_TYPE = "nemotron_h"
HF_ARCHITECTURE = "NemotronHForCausalLM"

# HF names of the layer kinds (transformers >= 5; older configs use "mamba"/"attention").
_HF_LAYER_TYPES = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp"}
_LEGACY_HF_LAYER_TYPES = {"mamba": MAMBA, "attention": ATTENTION}
_HF_PATTERN_CHARS = {MAMBA: MAMBA, ATTENTION: ATTENTION, MLP: MLP}

MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")

# The TE spec fuses each pre-norm into the next linear; the local spec keeps it separate
# (see models/specs.py). Mapping TE names onto local ones lets either spec export.
_TE_NORM_NAMES = {
    "mixer.in_proj.layer_norm_weight": "norm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


# --------------------------------------------------------------------------- QKV packing


def unpack_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron-core's per-group fused QKV weight -> HF (q, k, v) weights."""
    if num_heads % num_groups:
        raise HFConversionError(f"num_attention_heads={num_heads} is not divisible by num_query_groups={num_groups}")
    per_group = num_heads // num_groups
    rows = (num_heads + 2 * num_groups) * head_dim
    if qkv.dim() != 2 or qkv.shape[0] != rows:
        raise HFConversionError(
            f"fused QKV weight has shape {tuple(qkv.shape)}; expected ({rows}, hidden) for {num_heads} query heads, "
            f"{num_groups} KV groups and head_dim {head_dim}"
        )
    grouped = qkv.reshape(num_groups, per_group + 2, head_dim, qkv.shape[1])
    q = grouped[:, :per_group].reshape(num_heads * head_dim, -1)
    k = grouped[:, per_group].reshape(num_groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> torch.Tensor:
    """HF (q, k, v) weights -> megatron-core's per-group fused QKV weight."""
    if num_heads % num_groups:
        raise HFConversionError(f"num_attention_heads={num_heads} is not divisible by num_key_value_heads={num_groups}")
    per_group = num_heads // num_groups
    hidden = q.shape[-1]
    for name, t, heads in (("q_proj", q, num_heads), ("k_proj", k, num_groups), ("v_proj", v, num_groups)):
        if tuple(t.shape) != (heads * head_dim, hidden):
            raise HFConversionError(
                f"{name}.weight has shape {tuple(t.shape)}; expected ({heads * head_dim}, {hidden}) "
                f"for {heads} heads of head_dim {head_dim}"
            )
    grouped = torch.cat(
        [
            q.reshape(num_groups, per_group, head_dim, hidden),
            k.reshape(num_groups, 1, head_dim, hidden),
            v.reshape(num_groups, 1, head_dim, hidden),
        ],
        dim=1,
    )
    return grouped.reshape((num_heads + 2 * num_groups) * head_dim, hidden)


# --------------------------------------------------------------------------- key layout


def canonical_key(key: str) -> Optional[str]:
    """Our key in the local spec's naming; None for non-weight entries (`_extra_state`)."""
    if key.endswith("_extra_state"):
        return None
    if key.startswith("decoder.layers."):
        prefix, _, rest = key.partition(".layers.")
        index, _, name = rest.partition(".")
        name = _TE_NORM_NAMES.get(name, name)
        return f"{prefix}.layers.{index}.{name}"
    return key


def mcore_shapes(m: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every weight of our full (unsharded) model with its shape, in model order."""
    h, di = m.hidden_size, m.mamba_num_heads * m.mamba_head_dim
    gn = m.mamba_num_groups * m.mamba_state_dim
    shapes: Dict[str, Tuple[int, ...]] = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    for i, kind in enumerate(layer_types(m.pattern)):
        p = f"decoder.layers.{i}."
        if kind == MAMBA:
            shapes.update({
                f"{p}norm.weight": (h,),
                f"{p}mixer.in_proj.weight": (2 * di + 2 * gn + m.mamba_num_heads, h),
                f"{p}mixer.conv1d.weight": (di + 2 * gn, 1, m.conv_kernel),
                f"{p}mixer.conv1d.bias": (di + 2 * gn,),
                f"{p}mixer.dt_bias": (m.mamba_num_heads,),
                f"{p}mixer.A_log": (m.mamba_num_heads,),
                f"{p}mixer.D": (m.mamba_num_heads,),
                f"{p}mixer.norm.weight": (di,),
                f"{p}mixer.out_proj.weight": (h, di),
            })
        elif kind == ATTENTION:
            shapes.update({
                f"{p}input_layernorm.weight": (h,),
                f"{p}self_attention.linear_qkv.weight": ((m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels, h),
                f"{p}self_attention.linear_proj.weight": (h, m.num_attention_heads * m.kv_channels),
            })
        else:
            shapes.update({
                f"{p}pre_mlp_layernorm.weight": (h,),
                f"{p}mlp.linear_fc1.weight": (m.ffn_hidden_size, h),
                f"{p}mlp.linear_fc2.weight": (h, m.ffn_hidden_size),
            })
    shapes["decoder.final_norm.weight"] = (h,)
    if m.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (m.vocab_size, h)
    return shapes


def hf_shapes(m: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every weight of the HF model with its shape (lm_head only when untied)."""
    ours = mcore_shapes(m)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for key, shape in ours.items():
        if key.endswith("linear_qkv.weight"):
            p = _hf_layer_prefix(key)
            h = shape[1]
            shapes[f"{p}mixer.q_proj.weight"] = (m.num_attention_heads * m.kv_channels, h)
            shapes[f"{p}mixer.k_proj.weight"] = (m.num_query_groups * m.kv_channels, h)
            shapes[f"{p}mixer.v_proj.weight"] = (m.num_query_groups * m.kv_channels, h)
        else:
            shapes[_to_hf_name(key)] = shape
    return shapes


def _hf_layer_prefix(key: str) -> str:
    index = key.split(".")[2]
    return f"model.layers.{index}."


_LAYER_RENAMES = {
    "norm.weight": "norm.weight",
    "input_layernorm.weight": "norm.weight",
    "pre_mlp_layernorm.weight": "norm.weight",
    "self_attention.linear_proj.weight": "mixer.o_proj.weight",
    "mlp.linear_fc1.weight": "mixer.up_proj.weight",
    "mlp.linear_fc2.weight": "mixer.down_proj.weight",
    **{f"mixer.{name}": f"mixer.{name}" for name in MAMBA_PARAMS},
}
_TOP_RENAMES = {
    "embedding.word_embeddings.weight": "model.embeddings.weight",
    "decoder.final_norm.weight": "model.norm_f.weight",
    "output_layer.weight": "lm_head.weight",
}


def _to_hf_name(key: str) -> str:
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    name = key.split(".", 3)[3]
    return _hf_layer_prefix(key) + _LAYER_RENAMES[name]


# --------------------------------------------------------------------------- state dicts

_MODULE_PREFIX, _DISK_PREFIX = "model.", "backbone."


def to_disk_names(hf_state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers' module names -> the names NemotronH safetensors use (`backbone.`)."""
    return {(_DISK_PREFIX + k[len(_MODULE_PREFIX):] if k.startswith(_MODULE_PREFIX) else k): v for k, v in hf_state_dict.items()}


def from_disk_names(hf_state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`backbone.` (on disk) or `model.` names -> transformers' module names."""
    return {(_MODULE_PREFIX + k[len(_DISK_PREFIX):] if k.startswith(_DISK_PREFIX) else k): v for k, v in hf_state_dict.items()}



def _check_shape(key: str, tensor: torch.Tensor, shape: Tuple[int, ...], where: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise HFConversionError(
            f"{where}: `{key}` has shape {tuple(tensor.shape)} but the model config expects {tuple(shape)}; "
            "the weights were saved for a different architecture than the config describes"
        )


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our full TP1 state dict (local or TE naming) -> HF state dict, in HF model order."""
    ours: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = canonical_key(key)
        if name is not None:
            ours[name] = value
    expected = mcore_shapes(m)
    missing = [k for k in expected if k not in ours]
    unknown = sorted(k for k in ours if k not in expected)
    if missing or unknown:
        raise _mismatch(
            "model state dict does not match model config", missing, unknown,
            "is the pattern/num_layers in the checkpoint config the one the weights were saved with?",
        )
    hf: Dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        tensor = ours[key]
        _check_shape(key, tensor, shape, "checkpoint")
        if key.endswith("linear_qkv.weight"):
            q, k, v = unpack_qkv(tensor, m.num_attention_heads, m.num_query_groups, m.kv_channels)
            p = _hf_layer_prefix(key)
            hf[f"{p}mixer.q_proj.weight"], hf[f"{p}mixer.k_proj.weight"], hf[f"{p}mixer.v_proj.weight"] = q, k, v
        else:
            hf[_to_hf_name(key)] = tensor
    return hf


def _mismatch(what: str, missing, unknown, hint: str) -> "HFConversionError":
    """One error listing (the first few) missing and unexpected weight names."""
    return HFConversionError(
        what
        + (f"; missing: {', '.join(missing[:8])}" if missing else "")
        + (f"; unexpected: {', '.join(unknown[:8])}" if unknown else "")
        + f" ({hint})"
    )


# HF keys a NemotronH checkpoint may carry that our model has no counterpart for.
_IGNORABLE_HF_PREFIXES = ("mtp.", "model.mtp.")


def from_hf_state_dict(hf_state_dict: Mapping[str, torch.Tensor], m: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF state dict -> our full TP1 state dict (local-spec names), in model order.

    Multi-token-prediction weights (`mtp.*`) are dropped; `lm_head.weight` is dropped when
    the embeddings are tied. Anything else unknown is an error, so no weight is lost silently."""
    expected_hf = hf_shapes(m)
    missing = [k for k in expected_hf if k not in hf_state_dict]
    unknown = sorted(
        k for k in hf_state_dict
        if k not in expected_hf
        and not k.startswith(_IGNORABLE_HF_PREFIXES)
        and not (k == "lm_head.weight" and not m.untie_embeddings_and_output_weights)
    )
    if missing or unknown:
        raise _mismatch(
            "HF weights do not match config.json", missing, unknown,
            "MoE layers and biases are not supported; check that config.json belongs to these weights",
        )
    for key, shape in expected_hf.items():
        _check_shape(key, hf_state_dict[key], shape, "HF weights")
    ours: Dict[str, torch.Tensor] = {}
    for key in mcore_shapes(m):
        if key.endswith("linear_qkv.weight"):
            p = _hf_layer_prefix(key)
            ours[key] = pack_qkv(
                hf_state_dict[f"{p}mixer.q_proj.weight"],
                hf_state_dict[f"{p}mixer.k_proj.weight"],
                hf_state_dict[f"{p}mixer.v_proj.weight"],
                m.num_attention_heads, m.num_query_groups, m.kv_channels,
            )
        else:
            ours[key] = hf_state_dict[_to_hf_name(key)]
    return ours


# --------------------------------------------------------------------------- configs


def to_hf_config(m: ModelConfig, dtype: str, token_ids: Optional[Mapping[str, Optional[int]]] = None) -> Dict[str, Any]:
    """`config.json` contents for `NemotronHForCausalLM` describing our model.

    The layer pattern is written as `hybrid_override_pattern` (+ `num_hidden_layers`), which
    every NemotronH implementation reads (transformers converts it to `layers_block_type`)."""
    if dtype not in HF_DTYPE_NAMES:
        raise HFConversionError(f"dtype={dtype!r}: choose one of {', '.join(HF_DTYPE_NAMES)}")
    types = layer_types(m.pattern)
    d_inner = m.mamba_num_heads * m.mamba_head_dim
    config: Dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": len(types),
        "hybrid_override_pattern": "".join(_HF_PATTERN_CHARS[c] for c in types),
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "attention_bias": False,
        "mamba_num_heads": m.mamba_num_heads,
        "mamba_head_dim": m.mamba_head_dim,
        "ssm_state_size": m.mamba_state_dim,
        "n_groups": m.mamba_num_groups,
        "conv_kernel": m.conv_kernel,
        "chunk_size": m.chunk_size,
        # HF derives the Mamba width from heads x head_dim; expand is informational.
        "expand": d_inner // m.hidden_size if d_inner % m.hidden_size == 0 else 2,
        "use_conv_bias": True,
        "use_bias": False,
        "mamba_proj_bias": False,
        "mlp_bias": False,
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        # megatron-core's Mamba-2 dt initialisation range (fixed there, so fixed here).
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "layer_norm_epsilon": m.norm_epsilon,
        "residual_in_fp32": False,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "initializer_range": m.init_method_std,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "dtype": HF_DTYPE_NAMES[dtype],
        "torch_dtype": HF_DTYPE_NAMES[dtype],  # the name transformers < 4.56 reads
    }
    for name, value in (token_ids or {}).items():
        config[name] = value
    return config


def _hf_layer_chars(hf: Mapping[str, Any]) -> str:
    """Our pattern from `layers_block_type`/`layer_types` (list) or `hybrid_override_pattern`."""
    listed = hf.get("layers_block_type") or hf.get("layer_types")
    if listed:
        reverse = {v: k for k, v in _HF_LAYER_TYPES.items()} | _LEGACY_HF_LAYER_TYPES
        chars = []
        for i, name in enumerate(listed):
            if name not in reverse:
                raise HFConversionError(
                    f"config.json: layers_block_type[{i}]={name!r} is not supported; only "
                    f"{', '.join(sorted(set(_HF_LAYER_TYPES.values())))} layers convert (MoE layers do not)"
                )
            chars.append(reverse[name])
        return "".join(chars)
    pattern = hf.get("hybrid_override_pattern")
    if not pattern:
        raise HFConversionError("config.json has neither `layers_block_type` nor `hybrid_override_pattern`; is it a NemotronH config?")
    for i, char in enumerate(pattern):
        if char not in _HF_PATTERN_CHARS:
            raise HFConversionError(
                f"config.json: hybrid_override_pattern[{i}]={char!r} is not supported; "
                "only M (Mamba-2), * (attention) and - (MLP) layers convert (E = MoE does not)"
            )
    return pattern


def _first(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


# (key, value ours needs, fix) for options our layers do not implement.
_REQUIRED_HF_VALUES = [
    ("mlp_hidden_act", "relu2", "Nemotron-H MLPs use squared ReLU"),
    ("mamba_hidden_act", "silu", "the Mamba-2 conv activation is SiLU"),
    ("use_bias", False, "linear biases are not supported"),
    ("mamba_proj_bias", False, "Mamba projection biases are not supported"),
    ("mlp_bias", False, "MLP biases are not supported"),
    ("attention_bias", False, "attention biases are not supported"),
    ("use_conv_bias", True, "the Mamba-2 conv1d always has a bias here"),
    ("sliding_window", None, "sliding-window attention is not supported"),
]


def from_hf_config(hf: Mapping[str, Any], name: str = "nemotron-h") -> ModelConfig:
    """Our `ModelConfig` from a NemotronH `config.json` dict (new or legacy key names)."""
    if hf.get("model_type") not in (None, HF_MODEL_TYPE):
        raise HFConversionError(f"config.json: model_type={hf.get('model_type')!r}; only {HF_MODEL_TYPE!r} models convert")
    for key, wanted, why in _REQUIRED_HF_VALUES:
        if key in hf and hf[key] != wanted:
            raise HFConversionError(f"config.json: {key}={hf[key]!r} cannot be converted ({why}); it must be {wanted!r}")
    pattern = _hf_layer_chars(hf)
    default = ModelConfig()
    try:
        heads = int(hf["num_attention_heads"])
        return ModelConfig(
            name=name,
            pattern=pattern,
            num_layers=len(pattern),
            hidden_size=int(hf["hidden_size"]),
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(_first(hf, "num_key_value_heads", default=heads)),
            kv_channels=int(_first(hf, "head_dim", default=int(hf["hidden_size"]) // heads)),
            mamba_num_heads=int(hf["mamba_num_heads"]),
            mamba_head_dim=int(hf["mamba_head_dim"]),
            mamba_state_dim=int(hf["ssm_state_size"]),
            mamba_num_groups=int(_first(hf, "n_groups", "mamba_n_groups", default=8)),
            conv_kernel=int(_first(hf, "conv_kernel", "mamba_d_conv", default=4)),
            chunk_size=int(_first(hf, "chunk_size", "mamba_chunk_size", default=128)),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(_first(hf, "max_position_embeddings", default=default.max_position_embeddings)),
            norm_epsilon=float(_first(hf, "layer_norm_epsilon", default=1e-5)),
            untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", False)),
            init_method_std=float(_first(hf, "initializer_range", default=default.init_method_std)),
            spec=default.spec,
        )
    except KeyError as exc:
        raise HFConversionError(f"config.json is missing `{exc.args[0]}`, which a NemotronH config must have") from None
    except (TypeError, ValueError) as exc:
        raise HFConversionError(f"config.json: a size or setting is not a number ({exc}); fix the file") from None


def hf_dtype(hf: Mapping[str, Any]) -> Optional[str]:
    """Our params dtype name for config.json's `dtype`/`torch_dtype`, if it names one we use."""
    name = str(_first(hf, "dtype", "torch_dtype", default="")).replace("torch.", "")
    return {"float32": "fp32", "bfloat16": "bf16"}.get(name)


# Fields that decide which weights exist and their shapes; everything else in ModelConfig
# may differ between a checkpoint and the config that loads it.
WEIGHT_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "conv_kernel", "vocab_size",
    "untie_embeddings_and_output_weights",
)


def weight_layout_differences(a: ModelConfig, b: ModelConfig) -> List[str]:
    """`model.<field>: a vs b` for every field where the two configs give different weights."""
    diffs = [f"model.{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in WEIGHT_FIELDS if getattr(a, f) != getattr(b, f)]
    if layer_types(a.pattern) != layer_types(b.pattern):
        diffs.append(f"model.pattern layers: {layer_types(a.pattern)!r} vs {layer_types(b.pattern)!r}")
    return diffs
