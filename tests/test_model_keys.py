"""No dead `model.*` keys: changing any of them changes the built model (its parameter
shapes or values, or an attribute of one of its modules), unless the key is listed in
MODEL_KEYS_WITHOUT_WEIGHTS with the reason, as docs/config.md documents.

All models are built in this process (TP1, CPU), from a 3-layer smoke model.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from nemotron_train.config import load_config
from nemotron_train.config.schema import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
BASE = ["parallel.tp=1", "parallel.sp=false", "model.pattern=M*-", "model.num_layers=3", "launch.nproc_per_node=1"]

# Each key with one change that keeps the config valid (extra overrides keep it consistent).
CHANGES = {
    "pattern": ["model.pattern=M*-M", "model.num_layers=4"],
    "num_layers": ["model.num_layers=4", "model.pattern=MM*-"],
    "hidden_size": ["model.hidden_size=96"],
    "ffn_hidden_size": ["model.ffn_hidden_size=128"],
    "num_attention_heads": ["model.num_attention_heads=8"],
    "num_query_groups": ["model.num_query_groups=4"],
    "kv_channels": ["model.kv_channels=8"],
    "mamba_num_heads": ["model.mamba_num_heads=16"],
    "mamba_head_dim": ["model.mamba_head_dim=8"],
    "mamba_state_dim": ["model.mamba_state_dim=8"],
    "mamba_num_groups": ["model.mamba_num_groups=4"],
    "conv_kernel": ["model.conv_kernel=3"],
    "chunk_size": ["model.chunk_size=32"],
    "vocab_size": ["model.vocab_size=300"],
    "make_vocab_size_divisible_by": ["model.make_vocab_size_divisible_by=384"],
    "max_position_embeddings": ["model.max_position_embeddings=1024"],
    "norm_epsilon": ["model.norm_epsilon=1e-6"],
    "untie_embeddings_and_output_weights": ["model.untie_embeddings_and_output_weights=false"],
    "init_method_std": ["model.init_method_std=0.01"],
}
# Keys that do not shape the model, and why (docs/config.md says the same).
MODEL_KEYS_WITHOUT_WEIGHTS = {
    "name": "a label: run names and the name of an HF export",
    "spec": "chooses the implementation (te or local) of the same parameters; resolved once, local on CPU",
}


def fingerprint(model: torch.nn.Module) -> dict:
    """Parameter shapes, a digest of their values, and every plain attribute of every module."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    attrs = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if not attr.startswith("_") and attr != "training" and isinstance(value, (bool, int, float, str, tuple)):
                attrs[f"{name}.{attr}"] = repr(value)
    return {"shapes": {k: tuple(v.shape) for k, v in state.items()}, "values": digest.hexdigest(), "attrs": attrs}


@pytest.fixture(scope="module")
def build():
    from nemotron_train.hf.convert import end_single_process, start_single_process
    from nemotron_train.models.build import build_model

    started = []

    def _build(*overrides):
        cfg = load_config(SMOKE, [*BASE, *overrides])
        run, pgs = start_single_process(cfg, "cpu")
        started.append(True)
        return cfg, build_model(run, pgs)

    yield _build
    if started:
        end_single_process()


@pytest.fixture(scope="module")
def base_model(build):
    return build()


def test_every_model_key_is_covered():
    keys = {f.name for f in dataclasses.fields(ModelConfig)}
    assert keys == set(CHANGES) | set(MODEL_KEYS_WITHOUT_WEIGHTS), (
        "a new model.* key needs an entry in CHANGES (and wiring into the model) or in MODEL_KEYS_WITHOUT_WEIGHTS"
    )
    docs = (ROOT / "docs" / "config.md").read_text()
    for key in MODEL_KEYS_WITHOUT_WEIGHTS:
        assert f"`model.{key}`" in docs, f"docs/config.md does not say what model.{key} does"


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_changing_a_model_key_changes_the_model(key, build, base_model):
    _, base = base_model
    cfg, changed = build(*CHANGES[key])
    before, after = fingerprint(base), fingerprint(changed)
    differs = [part for part in ("shapes", "values", "attrs") if before[part] != after[part]]
    assert differs, f"model.{key} changed nothing in the built model: a dead key"


def test_conv_kernel_and_chunk_size_reach_every_mamba_mixer(build):
    cfg, model = build("model.conv_kernel=3", "model.chunk_size=8")
    mixers = [m for m in model.modules() if type(m).__name__ == "TorchMambaMixer"]
    assert mixers
    for mixer in mixers:
        assert (mixer.d_conv, mixer.chunk_size) == (3, 8)
        assert mixer.conv1d.weight.shape[-1] == 3 and mixer.conv1d.padding == (2,)


def test_chunk_size_does_not_change_the_output(build):
    """The multi-chunk scan (chunks of 8 over 40 tokens) and one chunk give the same logits."""
    from nemotron_train.commands.score import forward_logits

    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    _, one_chunk = build("model.chunk_size=64")
    _, five_chunks = build("model.chunk_size=8")
    a, b = forward_logits(one_chunk.eval(), tokens), forward_logits(five_chunks.eval(), tokens)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_norm_epsilon_reaches_every_layer_norm(build):
    _, model = build("model.norm_epsilon=1e-6")
    norms = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "RMSNorm"]
    assert len(norms) >= 4  # one per layer and the final norm
    assert all(m.eps == 1e-6 for _, m in norms), [(n, m.eps) for n, m in norms]


def test_vocabulary_is_padded_to_a_multiple_of_128_times_tp(build):
    from nemotron_train.models.vocab import padded_vocab_size

    cfg, model = build("model.vocab_size=300")
    assert model.embedding.word_embeddings.weight.shape[0] == 384
    assert model.output_layer.weight.shape[0] == 384
    m = cfg.model
    assert padded_vocab_size(m, 1) == 384 and padded_vocab_size(m, 2) == 512 and padded_vocab_size(m, 8) == 1024
    assert padded_vocab_size(dataclasses.replace(m, make_vocab_size_divisible_by=1), 3) == 300
    assert padded_vocab_size(dataclasses.replace(m, vocab_size=256), 2) == 256  # already a multiple: unchanged


def test_plan_counts_the_vocabulary_padding():
    from nemotron_train.models.cost import compute_plan

    cfg = load_config(SMOKE, ["model.vocab_size=300"])  # TP2
    plan = compute_plan(cfg, 2)
    assert (plan["vocab_size"], plan["padded_vocab_size"]) == (300, 512)
    base = compute_plan(load_config(SMOKE, ["model.vocab_size=512"]), 2)
    assert plan["params_per_rank"] == base["params_per_rank"]  # 300 rows take the room of 512
    assert plan["total_params"] < base["total_params"]  # published totals count the true vocabulary


def test_hf_import_with_conv_kernel_3_and_a_padded_vocabulary(tmp_path, build):
    """An HF NemotronH with conv_kernel 3 and a vocabulary of 96 (padded to 128) imports,
    gives transformers' logits, and exports back at 96 rows."""
    pytest.importorskip("transformers")
    from test_hf_convert import batch, hf_logits, load_safetensors_dir, make_hf_model

    from nemotron_train.commands.score import forward_logits
    from nemotron_train.hf.convert import end_single_process, export_hf, import_hf, load_checkpoint_model

    end_single_process()  # the conversions below start their own world of one
    hf = make_hf_model(tmp_path / "hf", seed=3, conv_kernel=3)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    loaded = load_checkpoint_model(tmp_path / "ckpt")
    try:
        assert loaded.cfg.model.conv_kernel == 3
        assert loaded.model.embedding.word_embeddings.weight.shape[0] == 128
        ours = forward_logits(loaded.model, batch(), vocab_size=loaded.cfg.model.vocab_size)
    finally:
        end_single_process()
    ref = hf_logits(hf, batch())
    assert ours.shape == ref.shape and (ours - ref).abs().max().item() <= 1e-4
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    exported, original = load_safetensors_dir(tmp_path / "out"), load_safetensors_dir(tmp_path / "hf")
    assert all(torch.equal(exported[k], v) for k, v in original.items()) and set(exported) == set(original)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 96


def test_a_checkpoint_with_other_vocabulary_rows_is_refused_with_the_fix():
    """dist_checkpointing loads 128 saved rows into 256 without a word (the rest stay as
    initialised), so the row counts are compared first."""
    from nemotron_train.models.vocab import saved_vocab_rows, vocab_rows_mismatch

    saved = {"model": {"vocab_size": 96, "make_vocab_size_divisible_by": 128}, "parallel": {"tp": 1}}
    model = load_config(SMOKE, ["model.vocab_size=96"]).model
    assert saved_vocab_rows(saved) == 128 and vocab_rows_mismatch(saved, model, 1) is None
    problem = vocab_rows_mismatch(saved, model, 2)
    assert "holds 128 vocabulary rows" in problem and "this run 256" in problem
    assert "model.make_vocab_size_divisible_by=64" in problem
    assert vocab_rows_mismatch(saved, dataclasses.replace(model, make_vocab_size_divisible_by=64), 2) is None
    legacy = {"model": {"vocab_size": 512}, "parallel": {"tp": 2}}  # written before padding: rows = vocab
    assert saved_vocab_rows(legacy) == 512 and vocab_rows_mismatch(legacy, load_config(SMOKE).model, 2) is None

