"""`nemotron-train export-hf | import-hf | score`: HF interop and checkpoint scoring.

    nemotron-train export-hf --checkpoint DIR [--iteration N] --output HFDIR [--dtype fp32|bf16] [--max-shard-size 5GB]
    nemotron-train import-hf --hf HFDIR --output DIR [--config RUN_CONFIG] [section.key=value ...]
    nemotron-train score --checkpoint DIR (--token-ids 1,2,3 | --text "..." | --data CONFIG [--split valid] [--max-batches N]) [--json]

Heavy imports (megatron-core, safetensors) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable

CHECKPOINT_HELP = "checkpoints directory (with latest_checkpointed_iteration.txt), a run directory, or one iter_XXXXXXX directory"


def register(subparsers) -> None:
    p = subparsers.add_parser("export-hf", help="write a run checkpoint as a Hugging Face NemotronH model")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--output", required=True, help="new directory for config.json and the safetensors")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="weight dtype (default: the run's params dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.set_defaults(func=_guarded(_export))

    p = subparsers.add_parser("import-hf", help="turn a Hugging Face NemotronH model into a model-only run checkpoint")
    p.add_argument("--hf", required=True, help="directory with config.json and model*.safetensors")
    p.add_argument("--output", required=True, help="new checkpoints directory; the run config is written there as config.yaml")
    p.add_argument("--config", default=None, help="run config whose non-model sections the written config keeps")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for the written run config")
    p.set_defaults(func=_guarded(_import))

    p = subparsers.add_parser("score", help="per-token log-probabilities or split perplexity of a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--token-ids", help="comma-separated token ids to score, e.g. 1,2,3")
    what.add_argument("--text", help="text to tokenise with the run's tokenizer and score")
    what.add_argument("--data", metavar="CONFIG", help="run config whose data section gives the dataset to evaluate")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="split for --data (default valid)")
    p.add_argument("--max-batches", type=int, default=None, help="stop --data after N micro-batches (default: whole split)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=_guarded(_score))


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report user errors (bad checkpoint, unconvertible model) as one line, exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from nemotron_train.checkpoint.hf import HFConversionError
        from nemotron_train.checkpoint.manager import CheckpointError

        try:
            return handler(args)
        except (HFConversionError, CheckpointError) as exc:
            print(f"nemotron-train {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def _export(args: argparse.Namespace) -> int:
    from nemotron_train.checkpoint.convert import export_hf

    with contextlib.redirect_stdout(sys.stderr):
        export_hf(args.checkpoint, args.output, args.iteration, args.dtype, args.max_shard_size)
    return 0


def _import(args: argparse.Namespace) -> int:
    from nemotron_train.checkpoint.convert import import_hf

    with contextlib.redirect_stdout(sys.stderr):
        import_hf(args.hf, args.output, args.config, args.overrides)
    return 0


def _score(args: argparse.Namespace) -> int:
    from nemotron_train.checkpoint import score
    from nemotron_train.checkpoint.convert import end_single_process, load_checkpoint_model

    if args.max_batches is not None and args.max_batches < 1:
        raise score.ScoreError(f"--max-batches {args.max_batches}: must be at least 1")
    # Library chatter goes to stderr so that `--json` output is exactly one object.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_checkpoint_model(args.checkpoint, args.iteration, device="auto")
        try:
            cfg = loaded.cfg
            if args.data:
                dataset, data_cfg = score.build_split(cfg, args.data, args.split)
                result = score.score_dataset(
                    loaded.model, dataset, data_cfg.train.micro_batch_size, args.max_batches, loaded.device, cfg.model.vocab_size
                )
            else:
                ids = (
                    score.parse_token_ids(args.token_ids, cfg.model.vocab_size)
                    if args.token_ids is not None
                    else score.tokenize_text(cfg, args.text)
                )
                logprobs, nll = score.score_token_ids(loaded.model, ids, loaded.device)
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
        print(score.format_logprobs(ids, logprobs, nll))
    return 0
