"""HF interop end to end: import-hf, export-hf, and our model against transformers' NemotronH.

A tiny NemotronH with every layer kind and random weights everywhere (norms, dt_bias, A_log,
D and conv biases too, so none of them is at a value that would hide a mapping mistake) is
saved with `save_pretrained`, imported, and compared with transformers' reference. Every
command runs in its own process (megatron's model-parallel state is process-global); run as
a script, this file is also the worker those processes execute (`logits`, `resave`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
HF_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    hybrid_override_pattern="M*-M-",
    num_attention_heads=8,
    num_key_value_heads=2,  # GQA with 2 groups: exercises the per-group QKV packing
    head_dim=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,  # sequences below are longer than a chunk and not a multiple of it
    layer_norm_epsilon=1e-5,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def env():
    e = dict(os.environ, PYTHONWARNINGS="ignore")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(var, None)
    return e


def cli(*args, expect_ok=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "nemotron_train", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def worker(*args, nproc=1, timeout=300):
    prefix = [sys.executable]
    if nproc > 1:
        from nemotron_train.platform import free_port

        prefix += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    proc = subprocess.run([*prefix, __file__, *map(str, args)], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def make_hf_model(out: Path, seed: int = 0, **config):
    """A random-weight NemotronH saved with save_pretrained (fp32); returns the model."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**{**HF_CONFIG, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn_like(p))  # softplus well above HF's dt floor (time_step_min)
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
            elif p.dim() == 1:  # norms, D, conv bias
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") or name.endswith("norm_f.weight") else torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def batch():
    return torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def load_safetensors_dir(path: Path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "tiny-nemotron-h"
    make_hf_model(path)
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    cli("import-hf", "--hf", hf_dir, "--output", out, "parallel.tp=2", "train.seq_length=64")
    return out


def test_import_writes_a_model_only_checkpoint_and_run_config(hf_dir, imported):
    from nemotron_train.hf.mapping import from_hf_config
    from nemotron_train.config import load_config

    assert (imported / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    meta = json.loads((imported / "iter_0000000" / "nemotron_train.json").read_text())
    assert meta["model_only"] is True and meta["step"] == 0 and meta["consumed_samples"] == 0
    cfg = load_config(imported / "config.yaml")
    expected = from_hf_config(json.loads((hf_dir / "config.json").read_text()), name="tiny-nemotron-h")
    assert cfg.model == expected
    assert meta["config"]["model"] == json.loads(json.dumps(cfg.model.__dict__))
    assert (cfg.parallel.tp, cfg.train.seq_length, cfg.precision.params_dtype) == (2, 64, "fp32")
    assert Path(cfg.checkpoint.load) == imported.resolve()


def test_our_model_gives_transformers_logits(hf_dir, imported, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.save(batch(), tmp_path / "tokens.pt")
    worker("logits", imported, tmp_path / "tokens.pt", tmp_path / "ours.pt")
    ours = torch.load(tmp_path / "ours.pt")
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), batch())
    assert ours.shape == ref.shape == (2, 21, VOCAB)
    diff = (ours - ref).abs().max().item()
    print(f"max |logits ours - transformers| = {diff:.3e}")
    assert diff <= 1e-4


def test_round_trip_is_bitwise_and_loads_in_transformers(hf_dir, imported, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    cli("export-hf", "--checkpoint", imported, "--output", out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    original, exported = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert list(exported) and set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["architectures"] == ["NemotronHForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "NemotronHForCausalLM"
    ref = hf_logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval(), batch())
    assert (hf_logits(model, batch()) - ref).abs().max().item() <= 1e-4


@pytest.mark.slow  # an import and an export of its own
@pytest.mark.slow
def test_pretraining_continues_from_an_import(tmp_path):
    """train starts from the imported weights (with the import's run config) and later
    restarts resume from the run's own checkpoints, not from the import again."""
    hf_dir, imported, run = tmp_path / "hf", tmp_path / "imported", tmp_path / "run"
    make_hf_model(hf_dir, vocab_size=300)  # room for the byte tokenizer of the mock data
    cli("import-hf", "--hf", hf_dir, "--output", imported, "parallel.tp=1", "parallel.sp=false", "train.seq_length=32")
    common = [f"run.output_dir={run}", "data.source=mock", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.eval_interval=0", "logging.progress_bar=false", "optimizer.lr=0.0", "optimizer.min_lr=0.0",
              "launch.nproc_per_node=1", f"launch.master_port={_free_port()}"]
    first = cli("train", imported / "config.yaml", *common, "train.steps=1")
    assert "initialised weights from" in first.stderr
    # lr 0: the saved weights are the imported ones, so exporting gives back the HF tensors.
    cli("export-hf", "--checkpoint", run / "checkpoints", "--output", tmp_path / "out")
    ours, ref = load_safetensors_dir(tmp_path / "out"), load_safetensors_dir(hf_dir)
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    common[-1] = f"launch.master_port={_free_port()}"
    second = cli("train", imported / "config.yaml", *common, "train.steps=2")
    assert "resumed from" in second.stderr and "initialised weights from" not in second.stderr


def _free_port():
    from nemotron_train.platform import free_port

    return free_port()


def test_bf16_round_trip_is_bitwise(tmp_path):
    """bf16 weights import as a bf16 run (A_log and D are held in fp32 there) and come back
    unchanged."""
    make_hf_model(tmp_path / "fp32", seed=2).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    cli("import-hf", "--hf", tmp_path / "hf", "--output", tmp_path / "ckpt")
    assert "params_dtype: bf16" in (tmp_path / "ckpt" / "config.yaml").read_text()
    cli("export-hf", "--checkpoint", tmp_path / "ckpt", "--output", tmp_path / "out")
    original, exported = load_safetensors_dir(tmp_path / "hf"), load_safetensors_dir(tmp_path / "out")
    assert set(exported) == set(original)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v) for k, v in original.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_shards_with_an_index_above_the_max_shard_size(hf_dir, imported, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    cli("export-hf", "--checkpoint", imported, "--output", out, "--max-shard-size", "40KB", "--dtype", "bf16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    from safetensors import safe_open

    for f in files:  # each shard holds at most 40 KB unless one tensor alone is larger
        with safe_open(str(out / f), "pt") as sf:
            sizes = [sf.get_tensor(k).numel() * 2 for k in sf.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    original, exported = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in exported.values())
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in original.items())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"].to(torch.bfloat16))


def test_export_refuses_a_non_empty_output(imported, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    proc = cli("export-hf", "--checkpoint", imported, "--output", tmp_path / "taken", expect_ok=False)
    assert proc.returncode == 2 and "is not empty" in proc.stderr


def test_export_names_the_weight_that_does_not_match_the_checkpoint_config(imported, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(imported, ckpt)
    meta_file = ckpt / "iter_0000000" / "nemotron_train.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["ffn_hidden_size"] = 96
    meta_file.write_text(json.dumps(meta))
    proc = cli("export-hf", "--checkpoint", ckpt, "--output", tmp_path / "out", expect_ok=False)
    assert proc.returncode == 2 and "decoder.layers.2.mlp.linear_fc1.weight" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_import_rejects_a_moe_model(hf_dir, tmp_path):
    bad = tmp_path / "moe"
    bad.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["layers_block_type"] = ["linear_attention", "moe"]
    (bad / "config.json").write_text(json.dumps(config))
    proc = cli("import-hf", "--hf", bad, "--output", tmp_path / "out", expect_ok=False)
    assert proc.returncode == 2 and "layers_block_type[1]='moe'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_import_overrides_may_not_change_the_weights(hf_dir, tmp_path):
    proc = cli("import-hf", "--hf", hf_dir, "--output", tmp_path / "out", "model.hidden_size=32", expect_ok=False)
    assert proc.returncode == 2 and "model.hidden_size: 64 vs 32" in proc.stderr


@pytest.mark.slow
# The import (TP2) pads the vocabulary of 96 to 256 rows; at TP1 the divisor keeps that padding.
@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=1", "parallel.pp=2", "model.pattern=M*-|M-",
                                                        "model.make_vocab_size_divisible_by=256"]], ids=["tp2", "pp2"])
def test_export_reshards_a_training_checkpoint(hf_dir, imported, tmp_path, layout):
    """A checkpoint written by the Checkpointer at TP2 or PP2, optimizer state included,
    exports to exactly the weights it was started from."""
    ckpts = tmp_path / "ckpts"
    worker("resave", imported, ckpts, *layout, nproc=2)
    from torch.distributed.checkpoint import FileSystemReader

    meta = json.loads((ckpts / "iter_0000005" / "nemotron_train.json").read_text())
    assert meta["step"] == 5 and "model_only" not in meta
    saved = FileSystemReader(str(ckpts / "iter_0000005")).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer.state.exp_avg.") for k in saved)  # export must skip these
    out = tmp_path / "exported"
    cli("export-hf", "--checkpoint", ckpts, "--output", out)
    original, exported = load_safetensors_dir(hf_dir), load_safetensors_dir(out)
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())


# --------------------------------------------------------------------------- worker


def _logits(ckpt: str, tokens_file: str, out: str) -> None:
    from nemotron_train.commands.score import forward_logits
    from nemotron_train.hf.convert import end_single_process, load_checkpoint_model

    loaded = load_checkpoint_model(ckpt, device="cpu")
    logits = forward_logits(loaded.model, torch.load(tokens_file), vocab_size=loaded.cfg.model.vocab_size)
    torch.save(logits.float(), out)
    end_single_process()


def _resave(ckpt: str, out: str, *overrides: str) -> None:
    """Load the imported weights into the given layout and save them with the Checkpointer."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from nemotron_train.checkpoint import Checkpointer, TrainState
    from nemotron_train.config import load_config
    from nemotron_train.distributed.groups import init_process_groups
    from nemotron_train.models.build import build_model
    from nemotron_train.platform import setup_platform
    from nemotron_train.resolve import resolve_run
    from nemotron_train.training.optim import build_optimizer, build_scheduler, wrap_ddp

    cfg = load_config(Path(ckpt) / "config.yaml", [*overrides, f"checkpoint.dir={out}", "model.spec=local", "optimizer.lr=0", "optimizer.min_lr=0", "optimizer.use_distributed_optimizer=false", "data.source=mock"])
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=None))
    platform = setup_platform()
    pgs = init_process_groups(cfg, platform)
    model = build_model(resolve_run(cfg, dist.get_world_size(), platform), pgs)
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
    loaded = dist_checkpointing.load({"model": sharded}, str(Path(ckpt) / "iter_0000000"))
    model.load_state_dict(loaded["model"], strict=False)
    ddp = wrap_ddp(cfg, model, model.config, pgs)
    optimizer = build_optimizer(cfg, [ddp])
    scheduler = build_scheduler(cfg, optimizer)
    # The distributed optimizer has no state to save before its first step; a step with
    # lr = 0 creates it and leaves every weight bitwise unchanged.
    ddp.zero_grad_buffer()
    optimizer.step()
    Checkpointer(cfg, pgs, is_logging_rank=dist.get_rank() == 0).save(ddp, optimizer, scheduler, TrainState(step=5, consumed_samples=40))
    dist.barrier()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"logits": _logits, "resave": _resave}[mode](*rest)
