"""Command line: ``python -m genlm_bytes_potential {sample,score} ...``.

    sample  grammar-constrained byte-level SMC (--regex, --lark or --json-schema)
    score   log-probability and bits/byte of a file under the byte beam
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as ``error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def _text_or_file(value: str) -> str:
    """``@path`` reads a file; anything else is the text itself."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise CLIError(f"file {path} does not exist")
        return path.read_text()
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m genlm_bytes_potential", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default=None, help="HF name or local path (default: embedded SmolLM2-135M-Instruct)")
        p.add_argument("--backend", default="auto", choices=["auto", "vllm", "paged", "hf", "mock"], help="LM backend (auto: vLLM when installed, else paged for Llama/Mistral/Qwen models, else hf; paged: Llama-family models, CUDA graphs on GPU; mock: random LM over the tokenizer, for tests)")
        p.add_argument("--K", type=_positive_int, default=8, help="beam width (default 8)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = sub.add_parser("sample", help="grammar-constrained byte-level SMC")
    model_args(s)
    s.add_argument("--prompt", default="", help="prompt text (or @file)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--regex", help="a regular expression the bytes must match (or @file)")
    g.add_argument("--lark", help="a Lark grammar (or @file)")
    g.add_argument("--json-schema", help="a JSON schema (or @file)")
    s.add_argument("--particles", type=_positive_int, default=8)
    s.add_argument("--max-bytes", type=_positive_int, default=64)
    s.add_argument("--ess-threshold", type=_fraction, default=0.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--record", metavar="PATH", help="write genlm-control's inference-visualizer JSON here")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("score", help="log-probability and bits/byte of a file")
    model_args(c)
    c.add_argument("file", help="file to score ('-' for stdin)")
    c.add_argument("--prompt", default="", help="text the file is conditioned on (or @file)")
    return parser


def _grammar(args):
    from genlm.control import BoolCFG, BoolFSA, JsonSchema

    try:
        if args.regex is not None:
            return BoolFSA.from_regex(_text_or_file(args.regex))
        if args.lark is not None:
            return BoolCFG.from_lark(_text_or_file(args.lark))
        schema = json.loads(_text_or_file(args.json_schema))
        return JsonSchema(schema)
    except CLIError:
        raise
    except Exception as exc:  # the grammar libraries raise many kinds
        kind = "regex" if args.regex is not None else "Lark grammar" if args.lark is not None else "JSON schema"
        raise CLIError(f"bad {kind}: {type(exc).__name__}: {exc}") from exc


def _load(args):
    from .models import load_lm

    try:
        return load_lm(args.model, backend=args.backend)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise CLIError(f"cannot load model {args.model or '(default)'}: {exc}") from exc


def _prompt_tokens(lm, prompt: str, chat: bool) -> tuple[list[int], bytes]:
    """Token ids (chat template) or prompt bytes for the beam to read."""
    if not chat:
        return [], prompt.encode()
    tok = lm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise CLIError("--chat: this model's tokenizer has no chat template")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids), b""


async def _sample(args) -> dict:
    import numpy as np
    import torch
    from genlm.control import SMC, direct_token_sampler

    from .potential import ByteBeamPotential
    from .sampling import byte_posterior

    grammar = _grammar(args)
    lm = _load(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokens, prompt = _prompt_tokens(lm, _text_or_file(args.prompt), args.chat)
    potential = ByteBeamPotential(lm, K=args.K, prompt=prompt, prompt_tokens=tokens)
    sampler = direct_token_sampler(potential * grammar)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_bytes, unit="B", desc="SMC", file=sys.stderr)
        sampler = _progress_sampler(sampler, bar)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the results
            seqs = await SMC(sampler)(args.particles, args.ess_threshold, args.max_bytes,
                                      json_path=args.record)
    finally:
        if bar is not None:
            bar.close()
    return {
        "samples": [{"text": k.decode("utf-8", "backslashreplace"), "weight": w} for k, w in byte_posterior(seqs)],
        "ess": float(seqs.ess),
        "log_ml": float(seqs.log_ml),
        "particles": args.particles,
    }


def _progress_sampler(sampler, bar):
    """``sampler`` with a progress bar advanced to the longest context it is asked for."""
    from genlm.control.sampler.token import TokenSampler

    class ProgressSampler(TokenSampler):
        def __init__(self):
            super().__init__(sampler.target)

        async def start_weight(self):
            return await sampler.start_weight()

        async def logw_eos(self, context):
            return await sampler.logw_eos(context)

        async def sample(self, context, draw=None):
            if len(context) + 1 > bar.n:
                bar.update(len(context) + 1 - bar.n)
            return await sampler.sample(context, draw=draw)

        async def cleanup(self):
            await sampler.cleanup()

    return ProgressSampler()


async def _score(args) -> dict:
    from .byte_lm import ByteLM

    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(args.file)
        if not path.is_file():
            raise CLIError(f"file {path} does not exist")
        data = path.read_bytes()
    lm = _load(args)
    score = await ByteLM(lm, K=args.K).score(data, prompt=_text_or_file(args.prompt).encode())
    return {"bytes": score.n_bytes, "logprob": score.logprob, "bits_per_byte": score.bits_per_byte, "heals": score.heals}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A byte grammar shares few of the 256 bytes with the LM: expected, not a problem.
    warnings.filterwarnings("ignore", message="Common vocabulary")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sample":
            result = asyncio.run(_sample(args))
        else:
            result = asyncio.run(_score(args))
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "sample":
        print(f"ESS {result['ess']:.2f} of {result['particles']} particles; log marginal likelihood {result['log_ml']:.3f}")
        if not result["samples"]:
            print("no particle completed within --max-bytes; try more bytes or particles")
        for s in result["samples"]:
            print(f"{s['weight']:8.4f}  {json.dumps(s['text'], ensure_ascii=False)}")
    else:
        print(f"{result['bytes']} bytes  log-prob {result['logprob']:.4f} nats  {result['bits_per_byte']:.4f} bits/byte")
    return 0
