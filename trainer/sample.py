"""`python -m trainer.sample CHECKPOINT_OR_HF_DIR --prompt TEXT [--speculative mtp]`: generate text.

Prints the prompt and its continuation, then one line of numbers: new tokens, tokens/s, main-model
forwards, tokens per forward and, with `--speculative mtp`, the share of MTP drafts the main model accepted.
Speculative decoding is greedy and yields exactly the greedy text; it changes only the number of forwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.errors import UserError, run_reporting_user_errors


def load(path: str) -> tuple[torch.nn.Module, Path | None, int | None]:
    """(model, tokenizer.json or None, eos id) from an HF export or a training checkpoint."""
    p = Path(path)
    if (p / "config.json").is_file():
        from model.hf import import_hf

        model = import_hf(p).eval()
        tok = p / "tokenizer.json"
        return model, tok if tok.is_file() else None, model.cfg.eos_token_id
    from trainer.checkpoint import resolve_checkpoint
    from trainer.export_hf import load_model, tokenizer_file

    try:
        ckpt = resolve_checkpoint(p)
    except FileNotFoundError as e:
        raise UserError("CHECKPOINT_OR_HF_DIR", str(e), "pass an HF export or a run/checkpoint dir") from None
    tok, ids = tokenizer_file(ckpt)
    return load_model(ckpt), tok, ids.get("eos_id")


def sample(args: argparse.Namespace) -> str:
    from model.generate import generate, generate_speculative_mtp
    from trainer.export_hf import read_tokenizer

    model, tok_path, eos = load(args.path)
    tokenizer_path = args.tokenizer or tok_path
    if tokenizer_path is None:
        raise UserError("--tokenizer", "no tokenizer.json found beside the model", "pass --tokenizer PATH")
    tok = read_tokenizer(Path(tokenizer_path))
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise UserError("--prompt", "the prompt encodes to no tokens", "give a non-empty prompt")
    prompt = torch.tensor([ids], dtype=torch.long)
    eos_id = None if args.ignore_eos else eos
    if args.speculative == "mtp":
        if args.temperature != 0:
            raise UserError("--temperature", "speculative decoding here is greedy", "use --temperature 0")
        if model.cfg.num_nextn_predict_layers == 0:
            raise UserError("--speculative", "the model has no MTP modules", "drop --speculative mtp")
        result = generate_speculative_mtp(model, prompt, args.max_new_tokens, eos_id=eos_id)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        result = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, eos_id=eos_id, generator=gen)
    text = tok.decode(result.tokens[0].tolist(), skip_special_tokens=False)
    rate = result.new_tokens / result.seconds if result.seconds > 0 else float("nan")
    acc = "n/a" if result.acceptance_rate is None else f"{result.acceptance_rate:.3f}"
    stats = (f"# mode={args.speculative or 'plain'} new_tokens={result.new_tokens} tokens_per_s={rate:.1f} "
             f"main_forwards={result.main_forwards} tokens_per_forward={result.tokens_per_forward:.2f} "
             f"acceptance_rate={acc}")
    return f"{text}\n{stats}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="HF export dir, run dir or checkpoint dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--speculative", choices=["mtp"], default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: found beside the model)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    args = parser.parse_args(argv)
    print(run_reporting_user_errors(sample, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
