"""Hugging Face export/import of run checkpoints, and single-process model loading.

Export: the run checkpoint (any saved TP/PP layout) is loaded into a TP1/PP1 model built in
one process; dist_checkpointing reshards it on the way in and only the `model` part is read,
so optimizer state never has to fit in memory. The weights are renamed (hf/mapping.py) and
written as safetensors next to a `config.json` that transformers' NemotronH loads.

Import: the reverse, into a model-only checkpoint (checkpoint/layout.py `save_model_only`:
`iter_0000000/` with `"model_only": true` in its metadata, tracker) plus a run config YAML
whose model section comes from the HF config. Training from it starts at step 0 with a
fresh optimizer.

Export and import run on the CPU whatever the machine has: they need memory for one copy of
the weights, not speed, and a large model fits in host memory where it would not in one GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from nemotron_train import rundir
from nemotron_train.checkpoint import layout
from nemotron_train.checkpoint.trust import trust_notice
from nemotron_train.config.loader import apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from nemotron_train.config.pattern import layer_types
from nemotron_train.config.schema import Config, ModelConfig
from nemotron_train.errors import CheckpointError, ConfigError, HFConversionError
from nemotron_train.hf.mapping import (
    DTYPE_NAMES,
    canonical_key,
    from_disk_names,
    from_hf_config,
    from_hf_state_dict,
    hf_dtype,
    to_disk_names,
    to_hf_config,
    to_hf_state_dict,
    weight_layout_differences,
)
from nemotron_train.models.vocab import VOCAB_WEIGHTS, pad_vocab, unpad_vocab

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# --------------------------------------------------------------------------- single-process model


def single_process_config(cfg: Config, spec: str) -> Config:
    """A config that builds `cfg`'s model in one process: TP1/PP1, no SP, no FP8.

    Pipeline boundaries are dropped from the pattern (layer keys are global, so any PP split
    loads), and FP8 is off because checkpoints hold high-precision weights. Nothing is
    trained or read, so the sections the build does not use (data, optimizer, schedule,
    batch sizes, launch, checkpointing) are the defaults, set to be valid for one process:
    the config of an import, whose data section is still to be filled in, builds too."""
    base = Config()
    # The vocabulary keeps the padding of cfg's TP size (models/vocab.py), so the weights of
    # a checkpoint written at any TP size load.
    divisor = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tp
    return dataclasses.replace(
        base,
        run=cfg.run,
        model=dataclasses.replace(
            cfg.model, pattern=layer_types(cfg.model.pattern), spec=spec, make_vocab_size_divisible_by=divisor
        ),
        parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, sp=False, cp=1),
        precision=dataclasses.replace(cfg.precision, fp8=dataclasses.replace(cfg.precision.fp8, enabled=False)),
        train=dataclasses.replace(
            base.train,
            seed=cfg.train.seed,
            deterministic=cfg.train.deterministic,
            seq_length=min(base.train.seq_length, cfg.model.max_position_embeddings),
        ),
        data=dataclasses.replace(base.data, source="mock"),
    )


def _check_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HFConversionError("this command runs as a single process; start it directly, not under torchrun or srun")


def start_single_process(cfg: Config, device: str):
    """A world of one for building `cfg`'s model at TP1/PP1: platform, the resolved run of
    `single_process_config(cfg, ...)` and its process groups. device: `cpu` or `auto` (GPU if any).

    The te and local specs read the same checkpoint keys (models/specs.py), so a run trained
    with `te` (or `auto`) is built with `auto` here: resolve picks te where it can run and
    local elsewhere (the CPU); a `local` run stays local."""
    from nemotron_train.checkpoint import install_mcore_fixes
    from nemotron_train.distributed.groups import init_process_groups
    from nemotron_train.platform import setup_platform
    from nemotron_train.resolve import resolve_run

    _check_single_process()
    platform = setup_platform(force_cpu=device == "cpu")
    install_mcore_fixes()
    spec = "local" if cfg.model.spec == "local" else "auto"
    run = resolve_run(single_process_config(cfg, spec), world_size=1, platform=platform)
    pgs = init_process_groups(run.cfg, platform)
    if pgs.tp.size() != 1 or pgs.pp.size() != 1:
        raise RuntimeError("model-parallel groups were already initialised with another layout in this process")
    return run, pgs


@dataclass
class LoadedModel:
    cfg: Config  # the run's config, from the checkpoint
    iter_dir: Path
    meta: Dict[str, Any]
    model: torch.nn.Module
    device: torch.device


def load_checkpoint_model(checkpoint: str | Path, iteration: Optional[int] = None, device: str = "cpu") -> LoadedModel:
    """Build the checkpoint's model at TP1/PP1 and load only its weights into it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    from nemotron_train.models.build import build_model

    iter_dir = layout.locate_checkpoint(checkpoint, iteration)
    trust_notice(iter_dir)  # export-hf and score read a checkpoint no run of theirs wrote
    meta = layout.read_meta(iter_dir)
    if "config" not in meta:
        raise CheckpointError(f"{layout.meta_file(iter_dir)} has no `config`; it was not written by this project's Checkpointer")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{layout.meta_file(iter_dir)}: its run config is not valid here ({exc})") from None
    run, pgs = start_single_process(cfg, device)
    model = build_model(run, pgs)
    # `_extra_state` holds FP8 scaling state, not weights; the optimizer, scheduler and RNG
    # entries in the checkpoint are simply not requested.
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    try:
        loaded = dist_checkpointing.load({"model": sharded}, str(iter_dir), strict=StrictHandling.RAISE_UNEXPECTED)
    except (CheckpointingException, TorchCheckpointException) as exc:
        # torch wraps the per-rank error; the first one says which key and shape.
        cause = next(iter(getattr(exc, "failures", {}).values()), (exc,))[0]
        raise CheckpointError(
            f"{iter_dir}: the saved weights do not match the model its {layout.META} describes ({cause}); "
            "the checkpoint is damaged or its metadata belongs to another run"
        ) from None
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if canonical_key(k) is not None]
    if missing or unexpected:
        raise CheckpointError(f"{iter_dir}: weights not loaded: missing {missing[:8]}, unexpected {list(unexpected)[:8]}")
    model.eval()
    return LoadedModel(cfg=cfg, iter_dir=iter_dir, meta=meta, model=model, device=run.platform.device)


def model_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict without `_extra_state` entries."""
    return {k: v for k, v in model.state_dict().items() if canonical_key(k) is not None}


def end_single_process() -> None:
    from nemotron_train.distributed.groups import destroy_process_groups

    destroy_process_groups()


# --------------------------------------------------------------------------- safetensors I/O


def parse_size(text: str | int) -> int:
    """`5GB` (10^9), `500MiB` (2^20), `20KB` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise HFConversionError(f"--max-shard-size {text!r}: use a size like 5GB, 500MB, 2GiB or a byte count")
    return int(value * _SIZE_UNITS[unit])


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    """Keys grouped in order into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_safetensors(tensors: Mapping[str, torch.Tensor], out_dir: Path, max_bytes: int) -> List[str]:
    """Write HF-style safetensors: one file, or numbered shards plus an index. Returns file names."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_bytes)
    names = [HF_WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: Dict[str, str] = {}
    for name, keys in zip(names, shards):
        # Own contiguous copies: safetensors refuses tensors that share storage (q/k/v views).
        save_file({k: tensors[k].detach().to("cpu", copy=True).contiguous() for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def read_safetensors(hf_dir: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (hf_dir / HF_INDEX).is_file():
        weight_map = json.loads((hf_dir / HF_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / HF_WEIGHTS).is_file():
        files = [HF_WEIGHTS]
    else:
        raise HFConversionError(
            f"{hf_dir}: no {HF_WEIGHTS} or {HF_INDEX}; only safetensors weights import "
            "(re-save the model with `save_pretrained(dir, safe_serialization=True)`)"
        )
    tensors: Dict[str, torch.Tensor] = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise HFConversionError(f"{hf_dir / HF_INDEX} lists {name}, which is missing; download the complete model")
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


@contextlib.contextmanager
def _staged_dir(final: Path) -> Iterator[Path]:
    """Write into a staging directory and rename on success (checkpoint/layout.py), so a
    crash never leaves a directory that looks complete."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise HFConversionError(f"--output {final} exists and is not empty; choose a new directory or delete it")
    staging = layout.fresh_staging_dir(final)
    yield staging
    layout.publish_dir(staging, final)


# --------------------------------------------------------------------------- export


def _hf_tokenizer(cfg: Config) -> Optional[Tuple[Path, int]]:
    """(tokenizers JSON file, end-of-document id) when the run's tokenizer is a HF one."""
    from nemotron_train.data.tokenizers import HFTokenizer, load_tokenizer
    from nemotron_train.errors import DataError

    try:
        tok = load_tokenizer(cfg.data.tokenizer.type, cfg.data.tokenizer.path)
    except DataError as exc:
        print(f"warning: exporting without a tokenizer: {exc}", file=sys.stderr)
        return None
    return (Path(tok.path), int(tok.eod)) if isinstance(tok, HFTokenizer) else None


def _write_tokenizer(cfg: Config, out_dir: Path) -> Dict[str, Optional[int]]:
    """Copy a HF tokenizer JSON (types `hf` and `bundled`) into the export; returns the
    token ids for config.json. The run's end-of-document token becomes HF's EOS."""
    from tokenizers import Tokenizer as RustTokenizer

    ids: Dict[str, Optional[int]] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    found = _hf_tokenizer(cfg)
    if found is None:
        return ids
    source, eod = found
    shutil.copyfile(source, out_dir / "tokenizer.json")
    eos = RustTokenizer.from_file(str(source)).id_to_token(eod)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": cfg.model.max_position_embeddings}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    ids["eos_token_id"] = eod
    return ids


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    iteration: Optional[int] = None,
    dtype: Optional[str] = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Run checkpoint -> HF NemotronH directory (config.json + safetensors [+ tokenizer])."""
    max_bytes = parse_size(max_shard_size)
    output = Path(output)
    loaded = load_checkpoint_model(checkpoint, iteration, device="cpu")
    try:
        cfg = loaded.cfg
        dtype = dtype or cfg.precision.params_dtype
        if dtype not in DTYPE_NAMES:
            raise HFConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
        hf_sd = to_hf_state_dict(unpad_vocab(model_weights(loaded.model), cfg.model.vocab_size), cfg.model)
        target = DTYPE_NAMES[dtype]
        hf_sd = to_disk_names({k: v.to(target) for k, v in hf_sd.items()})
        with _staged_dir(output) as staging:
            token_ids = _write_tokenizer(cfg, staging)
            hf_config = to_hf_config(cfg.model, dtype, token_ids)
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            files = write_safetensors(hf_sd, staging, max_bytes)
    finally:
        end_single_process()
    step = loaded.meta.get("step")
    print(f"exported {loaded.iter_dir} (step {step}) to {output}: {len(files)} safetensors file(s), {dtype}", file=sys.stderr)
    return output


# --------------------------------------------------------------------------- import


def _weights_dtype(hf_sd: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any]) -> str:
    """Params dtype for the imported run: the stored weights' dtype, so nothing is rounded."""
    stored = {t.dtype for t in hf_sd.values() if t.is_floating_point()}
    if stored == {torch.bfloat16}:
        return "bf16"
    if stored and stored <= {torch.float32, torch.bfloat16, torch.float16}:
        return "fp32"  # fp32 holds fp16 and mixed bf16/fp32 weights exactly
    return hf_dtype(hf_config) or "fp32"


def _get_dotted(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def compose_run_config(model: ModelConfig, params_dtype: str, config_path: Optional[str], overrides: Sequence[str], ckpt_dir: Path) -> Config:
    """The run config for training from an imported checkpoint.

    Precedence: the `--config` file (or defaults) < model section and params dtype from the HF
    model < command-line overrides. Overrides may not change the weight layout."""
    base = load_config(config_path, overrides)  # validates and interpolates the overrides
    resolved = config_to_dict(base)
    raw = config_to_dict(base)
    raw["model"] = dataclasses.asdict(model)
    raw["precision"]["params_dtype"] = params_dtype
    # Point the run at the imported weights unless the config already names where to start.
    writes_here = base.checkpoint.dir is not None and Path(base.checkpoint.dir).resolve() == ckpt_dir.resolve()
    if not base.checkpoint.load and not writes_here:
        raw["checkpoint"]["load"] = str(ckpt_dir.resolve())
    typed = [f"{item.partition('=')[0].strip()}={json.dumps(_get_dotted(resolved, item.partition('=')[0].strip()))}" for item in overrides]
    apply_overrides(raw, typed, {})
    cfg = config_from_dict(raw)
    diffs = weight_layout_differences(model, cfg.model)
    if diffs:
        raise HFConversionError(
            "overrides change the weight layout of the imported model: " + "; ".join(diffs)
            + ". Only settings such as model.pattern pipeline boundaries (|), model.spec or model.chunk_size may change"
        )
    return cfg


def _load_into(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy our-named full weights into a TP1 model (dtype cast by copy_)."""
    state = model.state_dict()
    by_canonical = {canonical_key(k): k for k in state if canonical_key(k) is not None}
    if set(by_canonical) != set(weights):
        missing = sorted(set(by_canonical) - set(weights))
        extra = sorted(set(weights) - set(by_canonical))
        raise HFConversionError(f"converted weights do not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
    # HF holds the true vocabulary; the model's padding rows start at zero.
    rows = {k: state[by_canonical[k]].shape[0] for k in VOCAB_WEIGHTS if k in by_canonical}
    for key, tensor in weights.items():
        state[by_canonical[key]] = pad_vocab({key: tensor}, rows[key])[key] if key in rows else tensor
    model.load_state_dict(state, strict=True)


def _read_hf_config(hf_dir: Path) -> Dict[str, Any]:
    try:
        hf_config = json.loads((hf_dir / "config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HFConversionError(f"--hf {hf_dir}: config.json is not valid JSON ({exc}); re-save the model") from None
    if not isinstance(hf_config, dict):
        raise HFConversionError(f"--hf {hf_dir}: config.json holds a {type(hf_config).__name__}, not a JSON object")
    return hf_config


def import_hf(hf_dir: str | Path, output: str | Path, config_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Path:
    """HF NemotronH directory -> model-only run checkpoint + run config YAML in `output`."""
    hf_dir, output = Path(hf_dir), Path(output)
    if not (hf_dir / "config.json").is_file():
        raise HFConversionError(f"--hf {hf_dir}: no config.json; pass a directory written by save_pretrained")
    if layout.holds_checkpoint(output):
        raise HFConversionError(f"--output {output} already holds a checkpoint; choose a new directory or delete it")
    hf_config = _read_hf_config(hf_dir)
    model_cfg = from_hf_config(hf_config, name=hf_dir.resolve().name or "nemotron-h")
    hf_sd = from_disk_names(read_safetensors(hf_dir))
    weights = from_hf_state_dict(hf_sd, model_cfg)  # validates names and shapes before any build
    cfg = compose_run_config(model_cfg, _weights_dtype(hf_sd, hf_config), config_path, overrides, output)
    if model_cfg.norm_epsilon != 1e-5:
        print(
            f"warning: config.json layer_norm_epsilon={model_cfg.norm_epsilon}; the Mamba gated norm here always "
            "uses 1e-5 (as megatron-core's), so outputs will differ slightly from transformers",
            file=sys.stderr,
        )
    run, pgs = start_single_process(cfg, "cpu")
    try:
        from nemotron_train.models.build import build_model

        model = build_model(run, pgs)
        _load_into(model, weights)
        iter_dir = layout.save_model_only(model, output, dataclasses.asdict(cfg), source=f"huggingface:{model_cfg.name}")
        save_config(cfg, rundir.config_file(output))
    finally:
        end_single_process()
    print(f"imported {hf_dir} into {iter_dir}; train from it with: nemotron-train train {rundir.config_file(output)}", file=sys.stderr)
    return iter_dir
