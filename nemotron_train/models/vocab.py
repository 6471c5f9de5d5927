"""Vocabulary padding, as Megatron-LM does it.

The embedding and output layer are split by rows across tensor-parallel ranks, and their
GEMMs run fastest on widths that are multiples of 128. So the model holds
`padded_vocab_size` rows: `model.vocab_size` rounded up to a multiple of
`model.make_vocab_size_divisible_by` x `parallel.tp` (128 x TP by default). The extra rows
are never a target and never an input; they take part in the softmax of the training loss,
as in Megatron. Everything that faces the outside world (HF export, scoring, token checks)
uses the true `model.vocab_size`: `unpad_vocab` drops the extra rows and `pad_vocab` adds
zero rows to weights coming in.

The padded size depends on TP, so a checkpoint moves to another TP size unchanged only when
both pad to the same size (a vocabulary that is a multiple of divisor x both TP sizes, or a
divisor chosen for the largest TP: the row count of a checkpoint is in `plan`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional

from nemotron_train.config.schema import ModelConfig

if TYPE_CHECKING:  # no torch at import: `plan` counts the padding without it
    import torch

# The weights with one row per vocabulary entry (our canonical names).
VOCAB_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """`model.vocab_size` rounded up to a multiple of make_vocab_size_divisible_by x tp."""
    multiple = model.make_vocab_size_divisible_by * tp
    return -(-model.vocab_size // multiple) * multiple


def unpad_vocab(weights: Mapping[str, torch.Tensor], vocab_size: int) -> Dict[str, torch.Tensor]:
    """The weights with the vocabulary rows beyond `vocab_size` dropped."""
    return {k: (v[:vocab_size] if k in VOCAB_WEIGHTS else v) for k, v in weights.items()}


def pad_vocab(weights: Mapping[str, torch.Tensor], padded_size: int) -> Dict[str, torch.Tensor]:
    """The weights with zero rows appended to the vocabulary weights, up to `padded_size`."""
    import torch

    out = {}
    for key, value in weights.items():
        if key in VOCAB_WEIGHTS and value.shape[0] < padded_size:
            value = torch.cat([value, value.new_zeros(padded_size - value.shape[0], *value.shape[1:])])
        out[key] = value
    return out


def saved_vocab_rows(saved_config: Mapping) -> int:
    """The vocabulary rows of a checkpoint, from the run config in its metadata. Checkpoints
    written before padding existed held exactly model.vocab_size rows."""
    model, tp = saved_config.get("model", {}), saved_config.get("parallel", {}).get("tp", 1)
    divisor = model.get("make_vocab_size_divisible_by")
    if divisor is None:
        return model["vocab_size"]
    multiple = divisor * tp
    return -(-model["vocab_size"] // multiple) * multiple


def vocab_rows_mismatch(saved_config: Mapping, model: ModelConfig, tp: int) -> Optional[str]:
    """Why a checkpoint's vocabulary rows do not fit this run (None if they do). Loading rows
    of another count would not fail by itself: the extra rows would stay uninitialised."""
    saved, rows = saved_vocab_rows(saved_config), padded_vocab_size(model, tp)
    if saved == rows:
        return None
    saved_tp = saved_config.get("parallel", {}).get("tp", 1)
    fix = (f"set model.make_vocab_size_divisible_by={saved // tp} to pad alike" if saved % tp == 0 and saved >= model.vocab_size
           else f"resume with parallel.tp={saved_tp}")
    return (f"the checkpoint holds {saved} vocabulary rows (model.vocab_size padded for parallel.tp={saved_tp}), "
            f"this run {rows} (parallel.tp={tp}, model.make_vocab_size_divisible_by="
            f"{model.make_vocab_size_divisible_by}); {fix}")
