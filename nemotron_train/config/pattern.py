"""Hybrid layer-pattern utilities.

A Nemotron-H layer stack is described by one string, one character per layer:

    M  Mamba-2 mixer layer
    *  self-attention layer
    -  MLP layer
    |  pipeline-stage boundary (not a layer)

`M-M*-` is a 5-layer stack; `M-M|*-M-` is a 7-layer stack split into two pipeline stages
of 3 and 4 layers. Without `|` the layers are split evenly over the pipeline stages.
"""

from __future__ import annotations

from typing import List

from nemotron_train.errors import ConfigError

MAMBA = "M"
ATTENTION = "*"
MLP = "-"
STAGE_BOUNDARY = "|"
LAYER_CHARS = (MAMBA, ATTENTION, MLP)

_NAMES = {MAMBA: "Mamba-2", ATTENTION: "attention", MLP: "MLP"}


def layer_name(char: str) -> str:
    """Human-readable name of a layer character (`M` -> `Mamba-2`)."""
    return _NAMES[char]


def layer_types(pattern: str) -> str:
    """The pattern with stage boundaries removed: one validated character per layer."""
    if not isinstance(pattern, str) or not pattern.replace(STAGE_BOUNDARY, ""):
        raise ConfigError(
            f"model.pattern={pattern!r} has no layers; use M (Mamba-2), * (attention) and - (MLP), "
            "e.g. model.pattern='M-M*-'"
        )
    for pos, char in enumerate(pattern):
        if char not in LAYER_CHARS and char != STAGE_BOUNDARY:
            raise ConfigError(
                f"model.pattern has invalid character {char!r} at position {pos} "
                f"(pattern {pattern!r}); valid characters are M (Mamba-2), * (attention), - (MLP) "
                "and | (pipeline-stage boundary)"
            )
    return pattern.replace(STAGE_BOUNDARY, "")


def balanced_stage_sizes(num_layers: int, pp: int) -> List[int]:
    """Stage sizes differing by at most one layer.

    The extra layers go to the middle stages: the first stage also holds the embedding and
    the last one the output layer and loss, so they get the smaller share.
    """
    assert pp >= 1 and num_layers >= pp, (num_layers, pp)
    base, extra = divmod(num_layers, pp)
    sizes = [base] * pp
    # Fill from the middle outwards so the ends stay light.
    order = sorted(range(pp), key=lambda i: (abs(2 * i - (pp - 1)), i))
    for i in order[:extra]:
        sizes[i] += 1
    return sizes


def suggest_stage_pattern(pattern: str, pp: int) -> str:
    """The pattern with `|` boundaries inserted so pp stages are as even as possible."""
    types = layer_types(pattern)
    pieces, start = [], 0
    for size in balanced_stage_sizes(len(types), pp):
        pieces.append(types[start : start + size])
        start += size
    return STAGE_BOUNDARY.join(pieces)


def _check_pp(pp: int) -> None:
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ConfigError(f"parallel.pp={pp!r} must be a positive integer (1 = no pipeline parallelism)")


def split_stages(pattern: str, pp: int) -> List[str]:
    """Per-pipeline-stage layer strings (without `|`).

    With `|` in the pattern the segments are the stages and there must be exactly pp of
    them; without, the layers are split evenly and num_layers must be divisible by pp.
    """
    _check_pp(pp)
    types = layer_types(pattern)
    if STAGE_BOUNDARY in pattern:
        stages = pattern.split(STAGE_BOUNDARY)
        if len(stages) != pp:
            raise ConfigError(
                f"model.pattern has {len(stages)} pipeline stages ({len(stages) - 1} `|` boundaries) "
                f"but parallel.pp={pp}; set parallel.pp={len(stages)} or change the `|` boundaries "
                f"to make {pp} stages"
                + (f", e.g. model.pattern='{suggest_stage_pattern(pattern, pp)}'" if len(types) >= pp else "")
            )
        for index, stage in enumerate(stages):
            if not stage:
                raise ConfigError(
                    f"model.pattern={pattern!r}: pipeline stage {index} is empty "
                    "(leading, trailing or doubled `|`); every stage needs at least one layer"
                )
        return stages
    if len(types) < pp:
        raise ConfigError(
            f"parallel.pp={pp} is larger than the number of layers in model.pattern ({len(types)}); "
            "every pipeline stage needs at least one layer, so lower parallel.pp"
        )
    if len(types) % pp != 0:
        raise ConfigError(
            f"model.pattern has {len(types)} layers, which parallel.pp={pp} does not divide evenly; "
            f"mark the stage boundaries with `|` in model.pattern, e.g. "
            f"model.pattern='{suggest_stage_pattern(pattern, pp)}', or choose a parallel.pp "
            f"that divides {len(types)}"
        )
    size = len(types) // pp
    return [types[i * size : (i + 1) * size] for i in range(pp)]


def stage_offset(pattern: str, pp: int, stage: int) -> int:
    """Global index of the first layer of pipeline stage `stage`."""
    stages = split_stages(pattern, pp)
    assert 0 <= stage < pp, f"pipeline stage {stage} out of range for pp={pp}"
    return sum(len(s) for s in stages[:stage])
