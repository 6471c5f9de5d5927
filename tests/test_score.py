"""`nemotron-train score`: per-token log-probabilities and split perplexity of a checkpoint,
checked against transformers' NemotronH on the same (imported) weights."""

import json
import math

import pytest
import torch

from test_hf_convert import cli, make_hf_model

# Byte tokenizer (257 ids, the default data.tokenizer) fits this vocabulary, so --text and
# --data work with the imported run's own tokenizer settings.
VOCAB = 260
IDS = [3, 17, 42, 5, 259, 1, 0, 64, 23, 9, 11, 77, 30, 101, 250, 7, 8, 19, 20]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("score")
    hf = make_hf_model(root / "hf", seed=1, vocab_size=VOCAB)
    cli("import-hf", "--hf", root / "hf", "--output", root / "ckpt")
    return hf, root / "ckpt"


def reference_logprobs(hf, ids):
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(tokens).logits.float(), dim=-1)
    return logp[0, :-1].gather(-1, tokens[0, 1:, None]).squeeze(-1)


def test_json_logprobs_match_transformers(models):
    hf, ckpt = models
    proc = cli("score", "--checkpoint", ckpt, "--token-ids", ",".join(map(str, IDS)), "--json")
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert set(result) == {"logprobs", "nll"}
    ours = torch.tensor(result["logprobs"], dtype=torch.float64)
    ref = reference_logprobs(hf, IDS).double()
    assert ours.shape == (len(IDS) - 1,)
    diff = (ours - ref).abs().max().item()
    print(f"max |logprob ours - transformers| = {diff:.3e}")
    assert diff <= 1e-4
    assert result["nll"] == pytest.approx(-ours.mean().item(), abs=1e-6)
    assert abs(result["nll"] + ref.mean().item()) <= 1e-4


def test_text_is_scored_with_the_runs_tokenizer(models):
    hf, ckpt = models
    text = "Mamba meets attention."
    proc = cli("score", "--checkpoint", ckpt, "--text", text)
    ids = list(text.encode("utf-8"))  # the byte tokenizer: one id per UTF-8 byte
    ref = reference_logprobs(hf, ids)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(ids) + 1  # header, one row per scored token, summary
    rows = [line.split() for line in lines[1:-1]]
    assert [int(r[1]) for r in rows] == ids[1:]
    assert max(abs(float(r[2]) - float(x)) for r, x in zip(rows, ref)) <= 1e-4
    assert lines[-1].startswith("mean NLL ") and f"over {len(ids) - 1} tokens" in lines[-1]
    assert abs(float(lines[-1].split()[2]) + ref.mean().item()) <= 1e-4


def test_split_perplexity_matches_transformers(models, tmp_path):
    from nemotron_train.config import load_config
    from nemotron_train.data import build_datasets

    hf, ckpt = models
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(
        f"run: {{output_dir: {tmp_path / 'run'}}}\n"
        "data: {source: mock, split: '50,50,0'}\n"
        "train: {seq_length: 24, micro_batch_size: 2, global_batch_size: 4, steps: 2, eval_iters: 2}\n"
    )
    proc = cli("score", "--checkpoint", ckpt, "--data", data_yaml, "--split", "valid", "--max-batches", "2", "--json")
    result = json.loads(proc.stdout)
    # Reference: the same samples, in order, through transformers.
    valid = build_datasets(load_config(data_yaml, [f"model.vocab_size={VOCAB}"]))[1]
    items = [valid[i] for i in range(4)]
    tokens, labels, mask = (torch.stack([torch.as_tensor(x[k]) for x in items]) for k in ("tokens", "labels", "loss_mask"))
    with torch.no_grad():
        logp = torch.log_softmax(hf(tokens.long()).logits.float(), dim=-1)
    nll = -(logp.gather(-1, labels.long()[..., None]).squeeze(-1) * mask).sum() / mask.sum()
    assert result["batches"] == 2 and result["tokens"] == int(mask.sum()) and result["split"] == "valid"
    assert abs(result["nll"] - nll.item()) <= 1e-4
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--token-ids", "1,2,300"], "token ids [300] are outside the model's vocabulary [0, 260)"),
        (["--token-ids", "1,x"], "expected comma-separated integers"),
        (["--token-ids", "5"], "need at least 2 tokens"),
    ],
)
def test_bad_token_ids_are_reported(models, args, message):
    proc = cli("score", "--checkpoint", models[1], *args, expect_ok=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_missing_checkpoint_is_reported(tmp_path):
    proc = cli("score", "--checkpoint", tmp_path, "--token-ids", "1,2", expect_ok=False)
    assert proc.returncode == 2 and "no latest_checkpointed_iteration.txt" in proc.stderr
