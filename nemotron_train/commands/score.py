"""`nemotron-train score`: log-probabilities and perplexity of a run checkpoint.

    nemotron-train score --checkpoint DIR (--token-ids 1,2,3 | --text "..." | --data CONFIG [--split valid] [--max-batches N]) [--json]

The model is built at TP1/PP1 in one process (on the GPU when there is one) and the
checkpoint's weights are loaded into it as for HF export (nemotron_train.hf.convert); FP8 is
off, so scores are those of the high-precision weights, the same numbers transformers gives
for the exported model. The scoring helpers below are pure functions of a model and tokens.
Megatron-core is imported only by the handler, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported where it is used, so `nemotron-train --help` stays fast
    import torch

from nemotron_train.commands.hf import CHECKPOINT_HELP
from nemotron_train.errors import ScoreError

SPLITS = ("train", "valid", "test")


def parse_token_ids(text: str, vocab_size: int) -> List[int]:
    """`--token-ids 1,2,3` -> [1, 2, 3], checked against the vocabulary."""
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise ScoreError(f"--token-ids {text!r}: expected comma-separated integers, e.g. --token-ids 1,2,3") from None
    check_token_ids(ids, vocab_size, "--token-ids")
    return ids


def check_token_ids(ids: Sequence[int], vocab_size: int, flag: str) -> None:
    if len(ids) < 2:
        raise ScoreError(f"{flag}: need at least 2 tokens to score (the first one only conditions), got {len(ids)}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ScoreError(f"{flag}: token ids {bad[:5]} are outside the model's vocabulary [0, {vocab_size})")


def forward_logits(
    model: torch.nn.Module, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Causal LM logits [b, s, V] for tokens [b, s] (mcore returns [b, s, V] without labels).
    With `vocab_size` (model.vocab_size), the padding rows of the vocabulary are dropped, so
    the distribution is the one an exported model gives."""
    import torch

    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, position_ids, None)
    return logits if vocab_size is None else logits[..., :vocab_size]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under each position's distribution, in fp32."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def score_token_ids(
    model: torch.nn.Module, ids: Sequence[int], device: torch.device, vocab_size: Optional[int] = None
) -> Tuple[List[float], float]:
    """log p(token_t | tokens_<t) for t >= 1, and their mean negative log-likelihood."""
    import torch

    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    logits = forward_logits(model, tokens, vocab_size=vocab_size)
    lp = token_logprobs(logits[:, :-1], tokens[:, 1:])[0]
    return [float(x) for x in lp.cpu()], float(-lp.mean())


def _stack(items: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    import torch

    return torch.stack([torch.as_tensor(item[key]) for item in items])


def score_dataset(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    max_batches: Optional[int],
    device: torch.device,
    vocab_size: int,
) -> Dict[str, float]:
    """Mean NLL and perplexity over a split: tokens/labels/loss_mask samples, in order."""
    import torch

    total_nll, total_tokens, batches = 0.0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        if max_batches is not None and batches >= max_batches:
            break
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        tokens = _stack(items, "tokens").long().to(device)
        labels = _stack(items, "labels").long().to(device)
        mask = _stack(items, "loss_mask").float().to(device)
        top = int(torch.maximum(tokens.max(), labels.max()))
        if top >= vocab_size:
            raise ScoreError(f"--data: token id {top} is outside the model's vocabulary ({vocab_size}); the data was tokenised for another model")
        positions = _stack(items, "position_ids").long().to(device) if "position_ids" in items[0] else None
        nll = -token_logprobs(forward_logits(model, tokens, positions, vocab_size), labels)
        total_nll += float((nll * mask).sum())
        total_tokens += float(mask.sum())
        batches += 1
    if total_tokens == 0:
        raise ScoreError("--data: the split has no scored tokens; check --split and the data section of the config")
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean), "tokens": int(total_tokens), "batches": batches}


def _tokenize(tokenizer: Any, text: str) -> List[int]:
    """Token ids from the run's tokenizer (megatron's `tokenize` or the common `encode`)."""
    fn = getattr(tokenizer, "tokenize", None) or getattr(tokenizer, "encode")
    ids = fn(text)
    return [int(i) for i in (ids.ids if hasattr(ids, "ids") else ids)]


def tokenize_text(cfg: Any, text: str) -> List[int]:
    from nemotron_train.data import build_tokenizer

    ids = _tokenize(build_tokenizer(cfg), text)
    check_token_ids(ids, cfg.model.vocab_size, "--text")
    return ids


def build_split(run_cfg: Any, data_config: str, split: str) -> Tuple[Any, Any]:
    """(dataset, data cfg) for one split of `--data CONFIG`, tokenised as the run was."""
    import dataclasses

    from nemotron_train.config import load_config
    from nemotron_train.data import build_datasets, build_tokenizer

    if split not in SPLITS:
        raise ScoreError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    data_cfg = load_config(data_config)
    # The model is the checkpoint's; the data config supplies data, sequence length and batch size.
    data_cfg = dataclasses.replace(data_cfg, model=run_cfg.model)
    datasets = build_datasets(data_cfg, build_tokenizer(data_cfg))
    dataset = datasets[SPLITS.index(split)]
    if dataset is None or len(dataset) == 0:
        raise ScoreError(f"--data {data_config}: the {split} split is empty; give it weight in data.split or a {split}_blend")
    return dataset, data_cfg


def format_logprobs(ids: Sequence[int], logprobs: Iterable[float], nll: float) -> str:
    lines = [f"{'pos':>5} {'token':>8} {'logprob':>12}"]
    for pos, (tok, lp) in enumerate(zip(ids[1:], logprobs), start=1):
        lines.append(f"{pos:>5} {tok:>8} {lp:>12.6f}")
    lines.append(f"mean NLL {nll:.6f} (perplexity {math.exp(nll):.4f}) over {len(ids) - 1} tokens")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="per-token log-probabilities or split perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--token-ids", help="comma-separated token ids to score, e.g. 1,2,3")
    what.add_argument("--text", help="text to tokenise with the run's tokenizer and score")
    what.add_argument("--data", metavar="CONFIG", help="run config whose data section gives the dataset to evaluate")
    p.add_argument("--split", default="valid", choices=list(SPLITS), help="split for --data (default valid)")
    p.add_argument("--max-batches", type=int, default=None, help="stop --data after N micro-batches (default: whole split)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=_score)


def _score(args: argparse.Namespace) -> int:
    """Bad input or a bad checkpoint raises a UserError (ScoreError, CheckpointError), which
    the command line reports as one line with exit status 2."""
    from nemotron_train.hf.convert import end_single_process, load_checkpoint_model

    if args.max_batches is not None and args.max_batches < 1:
        raise ScoreError(f"--max-batches {args.max_batches}: must be at least 1")
    # Library chatter goes to stderr so that `--json` output is exactly one object.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_checkpoint_model(args.checkpoint, args.iteration, device="auto")
        try:
            cfg = loaded.cfg
            if args.data:
                dataset, data_cfg = build_split(cfg, args.data, args.split)
                result = score_dataset(
                    loaded.model, dataset, data_cfg.train.micro_batch_size, args.max_batches, loaded.device, cfg.model.vocab_size
                )
            else:
                ids = (
                    parse_token_ids(args.token_ids, cfg.model.vocab_size)
                    if args.token_ids is not None
                    else tokenize_text(cfg, args.text)
                )
                logprobs, nll = score_token_ids(loaded.model, ids, loaded.device, cfg.model.vocab_size)
        finally:
            end_single_process()
    if args.data:
        result["split"] = args.split
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.split}: mean NLL {result['nll']:.6f}, perplexity {result['ppl']:.4f} "
                  f"over {result['tokens']} tokens in {result['batches']} batches")
    elif args.json:
        print(json.dumps({"logprobs": logprobs, "nll": nll}))
    else:
        print(format_logprobs(ids, logprobs, nll))
    return 0
