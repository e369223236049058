"""Command line: ``python -m genlm_bytes_potential COMMAND ...``.

    sample     grammar-constrained byte-level SMC (--regex, --lark or --json-schema)
    score      log-probability and bits/byte of files under the byte beam
    next-byte  the next-byte distribution after a prompt
    generate   bytes sampled (or the likeliest, --greedy) after a prompt

stdout carries the results only; progress bars, warnings and (with --verbose) the
engines' logs go to stderr. With --json the results are one JSON document: a
probability of 0 gives a log-probability of null (JSON has no -Infinity), with the
reason beside it. Bad input exits with status 2 and a message.
"""

# Only the standard library at import time: `--help` and argument errors must not wait for
# torch, vLLM or genlm-control (seconds); each command imports what it needs.
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

EXIT_USAGE = 2

#: JSON-schema keywords that genlm-control's ``JsonSchema`` parser does not enforce while a
#: value is being generated: its validator checks them only once the value (or an
#: enclosing array/object) is complete, so a particle that breaks one dies late.
LATE_SCHEMA_KEYWORDS = frozenset(
    {
        "maxLength",
        "minLength",
        "format",
        "maximum",
        "minimum",
        "exclusiveMaximum",
        "exclusiveMinimum",
        "multipleOf",
        "maxItems",
        "minItems",
        "uniqueItems",
        "contains",
        "additionalItems",
        "maxProperties",
        "minProperties",
        "patternProperties",
        "propertyNames",
        "dependencies",
        "allOf",
        "oneOf",
        "not",
        "if",
        "$ref",
    }
)
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "definitions", "$defs", "dependencies"})


class CLIError(Exception):
    """A user error: printed as ``error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------- arguments
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


def _threshold(text: str) -> float:
    value = _fraction(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 would prune every candidate; expected a number in [0, 1)")
    return value


def _arg_bytes(value: str) -> bytes:
    """An argument's bytes as the shell passed them (undecodable bytes included)."""
    return os.fsencode(value)


def _text_or_file(value: str) -> bytes:
    """``@path`` reads a file; anything else is the argument itself, as bytes."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise CLIError(f"file {path} does not exist")
        return path.read_bytes()
    return _arg_bytes(value)


def _as_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(
            f"{what} is not valid UTF-8: byte {data[e.start]:#04x} at position {e.start} "
            f"({data[max(0, e.start - 20) : e.start + 1]!r})"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m genlm_bytes_potential",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="HF name or local path (default: embedded SmolLM2-135M-Instruct)")
        p.add_argument(
            "--backend",
            default="auto",
            choices=["auto", "vllm", "paged", "hf", "mock"],
            help="LM backend (auto: the fastest that runs the model, as measured on a GPU and a CPU: "
            "paged for Llama/Mistral/Qwen models, else vllm when installed, else hf; paged: "
            "Llama-family models, CUDA graphs on GPU; mock: random LM over the tokenizer, for tests)",
        )
        p.add_argument("--dtype", default=None, help="weights' dtype, e.g. float32, bfloat16 (default: the backend's)")
        p.add_argument(
            "--device",
            default=None,
            help="where paged and hf run the model: cpu, cuda, cuda:1 (default: the GPU when torch sees one)",
        )
        p.add_argument("--K", type=_positive_int, default=8, help="beam width (default 8)")
        p.add_argument(
            "--prune-threshold",
            type=_threshold,
            default=0.0,
            help="drop candidates below this share of the beam's weight (default 0)",
        )
        p.add_argument(
            "--exact",
            action="store_true",
            help="no pruning (K unlimited, threshold 0): the exact byte-level distribution; its "
            "cost grows exponentially with the length, for short strings only",
        )
        p.add_argument("--canonical", action="store_true", help="commit only canonical tokenizations")
        p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("-v", "--verbose", action="store_true", help="the engines' logs, to stderr")

    s = sub.add_parser("sample", help="grammar-constrained byte-level SMC")
    common(s)
    s.add_argument("--prompt", default="", help="prompt text (or @file)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--regex", help="a regular expression the bytes must match (or @file)")
    g.add_argument("--lark", help="a Lark grammar (or @file)")
    g.add_argument("--json-schema", help="a JSON schema (or @file)")
    s.add_argument(
        "--sampler",
        choices=["direct", "awrs"],
        default="direct",
        help="direct: sample each byte from the product (default); awrs: genlm-control's adaptive "
        "weighted rejection sampling, checking the grammar only on the bytes it draws",
    )
    s.add_argument("--particles", type=_positive_int, default=8)
    s.add_argument("--max-bytes", type=_positive_int, default=64)
    s.add_argument("--ess-threshold", type=_fraction, default=0.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--record", metavar="PATH", help="write genlm-control's inference-visualizer JSON here")

    c = sub.add_parser("score", help="log-probability and bits/byte of files")
    common(c)
    c.add_argument(
        "files",
        nargs="+",
        metavar="file",
        help="files to score ('-' for stdin); several are read together, in lockstep",
    )
    c.add_argument("--prompt", default="", help="text each file is conditioned on (or @file)")

    n = sub.add_parser("next-byte", help="the next-byte distribution after a prompt")
    common(n)
    n.add_argument("--prompt", default="", help="prompt text (or @file)")
    n.add_argument("--top", type=_positive_int, default=10, help="how many outcomes to show (default 10)")

    t = sub.add_parser("generate", help="bytes sampled (or the likeliest) after a prompt, no grammar")
    common(t)
    t.add_argument("--prompt", default="", help="prompt text (or @file)")
    t.add_argument("--max-bytes", type=_positive_int, default=64)
    t.add_argument("--greedy", action="store_true", help="the likeliest byte at each step")
    t.add_argument("--seed", type=int, default=0)
    return parser


# ----------------------------------------------------------------------------- output
def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _json_safe(value):
    """``value`` with every non-finite float replaced by None (JSON has no Infinity/NaN)."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _show(data: bytes) -> str:
    """Bytes as text for people: UTF-8, undecodable bytes as ``\\xNN``."""
    return data.decode("utf-8", "backslashreplace")


@contextlib.contextmanager
def _results_stdout():
    """The stream for results. Meanwhile whatever else writes to stdout (vLLM's logger, C
    libraries, engine subprocesses: file descriptor 1) goes to stderr."""
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a file, e.g. captured by a test
        results = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            yield results
        return
    sys.stdout.flush()
    saved = os.dup(out_fd)
    os.dup2(err_fd, out_fd)
    results = os.fdopen(saved, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    try:
        yield results
    finally:
        results.flush()
        sys.stdout.flush()
        os.dup2(saved, out_fd)
        os.close(saved)


#: What ``_quiet_engines`` sets: vLLM's and transformers' log levels and streams.
ENGINE_LOG_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_STREAM", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


@contextlib.contextmanager
def _quiet_engines(verbose: bool):
    """Engine logs: errors only unless ``verbose``, to stderr either way (variables the user
    set win). vLLM and transformers read these when imported, i.e. inside the command; the
    environment is restored afterwards."""
    import logging

    saved = {k: os.environ.get(k) for k in ENGINE_LOG_ENV}
    vllm_logger = logging.getLogger("vllm")  # some vLLM modules log at import, before vLLM configures it
    saved_level = vllm_logger.level
    if not verbose:
        vllm_logger.setLevel(logging.ERROR)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "ERROR")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings():
            if not verbose:
                # A byte grammar shares few of the 256 bytes with the LM: expected, not a problem.
                warnings.filterwarnings("ignore", message="Common vocabulary")
            yield
    finally:
        vllm_logger.setLevel(saved_level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- pieces
def _regex_error(pattern: str, exc: Exception) -> str:
    """What is wrong with ``pattern``: Python's own diagnosis when it has one, else the
    grammar library's (interegular's parser says where it stopped and what it expected)."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    detail = (str(exc) or str(exc.__context__ or "")).strip() or type(exc).__name__
    return f"Python accepts it, but genlm-control's byte-level regex (interegular) does not: {detail.splitlines()[0]}"


def late_schema_keywords(schema, path: str = "") -> list[str]:
    """``keyword at /json/pointer`` for every keyword of ``LATE_SCHEMA_KEYWORDS`` in ``schema``."""
    found = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            where = f"{path}/{key}"
            if key in LATE_SCHEMA_KEYWORDS:
                found.append(f"{key} at {path or '/'}")
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for name, sub in value.items():
                    found += late_schema_keywords(sub, f"{where}/{name}")
            elif key not in ("enum", "const", "default", "examples"):
                found += late_schema_keywords(value, where)
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            found += late_schema_keywords(sub, f"{path}/{i}")
    return found


def _grammar(args):
    from genlm.control import BoolCFG, BoolFSA, JsonSchema

    if args.regex is not None:
        pattern = _as_text(_text_or_file(args.regex), "--regex")
        try:
            return BoolFSA.from_regex(pattern)
        except Exception as exc:  # interegular raises bare InvalidSyntax / Exception
            raise CLIError(f"bad regex {pattern!r}: {_regex_error(pattern, exc)}") from exc
    if args.lark is not None:
        grammar = _as_text(_text_or_file(args.lark), "--lark")
        try:
            return BoolCFG.from_lark(grammar)
        except Exception as exc:  # lark raises many kinds
            raise CLIError(f"bad Lark grammar: {type(exc).__name__}: {exc}") from exc
    try:
        schema = json.loads(_text_or_file(args.json_schema))
    except ValueError as exc:
        raise CLIError(f"bad JSON schema: not JSON: {exc}") from exc
    try:
        grammar = JsonSchema(schema)
    except Exception as exc:  # jsonschema's SchemaError, or the parser's
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = getattr(exc, "json_path", None)
        raise CLIError(f"bad JSON schema: {first}" + (f" (at {where} of the schema)" if where else "")) from exc
    late = late_schema_keywords(schema)
    if late:
        print(
            f"warning: the JSON schema's {', '.join(late)} "
            f"{'is' if len(late) == 1 else 'are'} checked only once a value is complete (genlm-control's "
            "JsonSchema does not enforce them byte by byte): particles that break them die late, and with a "
            "small --max-bytes none may complete",
            file=sys.stderr,
        )
    return grammar


def _beam_params(args) -> dict:
    if args.exact:
        if args.prune_threshold > 0:
            raise CLIError(f"--exact keeps every candidate; it conflicts with --prune-threshold {args.prune_threshold}")
        return {"K": None, "prune_threshold": 0.0, "canonical": args.canonical}
    return {"K": args.K, "prune_threshold": args.prune_threshold, "canonical": args.canonical}


def _load(args):
    from .models import load_lm

    opts = {k: v for k, v in (("dtype", args.dtype), ("device", args.device)) if v is not None}
    try:
        return load_lm(args.model, backend=args.backend, **opts)
    except (FileNotFoundError, OSError, ValueError, TypeError) as exc:
        message = str(exc).replace("Use HFTokenLM.", "").strip()
        if args.backend == "paged" and isinstance(exc, ValueError):  # a model the paged backend does not run
            message += " Run it with --backend hf (any full-attention decoder)."
        raise CLIError(f"cannot load model {args.model or '(default)'} on backend {args.backend}: {message}") from exc


def _chat_tokens(lm, text: str) -> list[int]:
    """``text`` wrapped in the tokenizer's chat template, as a plain list of token ids."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        raise CLIError("--chat: this model's tokenizer has no chat template")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(t) for t in ids]


def _progress(args, total: int, desc: str):
    if args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=total >= 1000, desc=desc, file=sys.stderr, dynamic_ncols=True)


def _lm_counters(model) -> tuple[int, int]:
    return model.stats.batch_calls, model.stats.contexts


def _diagnostics(model, before: tuple[int, int], n_bytes: int, seconds: float) -> dict:
    calls, contexts = (a - b for a, b in zip(_lm_counters(model), before))
    device = getattr(model.lm, "device", None)
    return {
        "device": None if device is None else str(device),
        "lm_calls": calls,
        "lm_contexts": contexts,
        "lm_calls_per_byte": calls / n_bytes if n_bytes else None,
        "seconds": seconds,
        "bytes_per_s": n_bytes / seconds if seconds > 0 else None,
    }


# ----------------------------------------------------------------------------- commands
async def _sample(args) -> dict:
    import random

    import numpy as np
    import torch
    from genlm.control import AWRS, SMC, direct_token_sampler

    from .potential import ByteBeamPotential
    from .sampling import byte_posterior
    from .tokens import as_byte_tokens

    grammar = _grammar(args)
    params = _beam_params(args)
    prompt = _text_or_file(args.prompt)
    chat_text = _as_text(prompt, "--prompt (with --chat)") if args.chat else None
    lm = _load(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokens = _chat_tokens(lm, chat_text) if args.chat else []
    try:
        potential = ByteBeamPotential(lm, prompt=b"" if args.chat else prompt, prompt_tokens=tokens, **params)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if args.sampler == "awrs":
        sampler = AWRS(potential, as_byte_tokens(grammar), seed=args.seed)
    else:
        sampler = direct_token_sampler(potential * grammar)
    bar = _progress(args, args.max_bytes, "SMC")
    if bar is not None:
        sampler = _progress_sampler(sampler, bar)
    before = _lm_counters(potential.model)
    start = time.perf_counter()
    try:
        seqs = await SMC(sampler)(args.particles, args.ess_threshold, args.max_bytes, json_path=args.record)
    except ValueError as exc:  # e.g. a prompt byte no token reads
        raise CLIError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    steps = max((len(c) for c in seqs.contexts), default=0)
    samples = []
    for text, weight in byte_posterior(seqs):
        (beam,) = await potential.beams([text])
        samples.append(
            {
                "text": _show(text),
                "weight": weight,
                "bytes": len(text),
                "pruned_mass": beam.stats.pruned_mass,
                "heals": beam.stats.heals,
            }
        )
    return {
        "samples": samples,
        "ess": float(seqs.ess),
        "log_ml": float(seqs.log_ml),
        "particles": args.particles,
        "sampler": args.sampler,
        "K": params["K"],
        "prune_threshold": params["prune_threshold"],
        "diagnostics": _diagnostics(potential.model, before, steps, seconds),
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
    """One file: its score. Several: each file's score (read together, ``batch_score``)
    and their total."""
    from .byte_lm import ByteLM, Score

    names = args.files
    texts = [_read_file(name) for name in names]
    prompt = _text_or_file(args.prompt)
    params = _beam_params(args)
    blm = ByteLM(_load(args), **params)
    _check_prompt(blm, prompt)
    bar = _progress(args, sum(map(len, texts)), "score")
    before = _lm_counters(blm.model)
    start = time.perf_counter()
    try:
        scores = await blm.batch_score(
            texts, prompt=prompt, on_byte=None if bar is None else lambda n: bar.update(n - bar.n)
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    results = [_score_result(blm, data, score, params) for data, score in zip(texts, scores)]
    read = sum(len(t) if s.impossible_at is None else s.impossible_at + 1 for t, s in zip(texts, scores))
    diagnostics = _diagnostics(blm.model, before, read, seconds)
    if len(results) == 1:
        return {**results[0], "diagnostics": diagnostics}
    total = Score(sum(s.logprob for s in scores), sum(s.n_bytes for s in scores))
    return {
        "files": [{"file": name, **r} for name, r in zip(names, results)],
        "bytes": total.n_bytes,
        "logprob": total.logprob,
        "bits_per_byte": total.bits_per_byte,
        "K": params["K"],
        "prune_threshold": params["prune_threshold"],
        "diagnostics": diagnostics,
    }


def _read_file(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    path = Path(name)
    if not path.is_file():
        raise CLIError(f"file {path} does not exist")
    return path.read_bytes()


def _score_result(blm, data: bytes, score, params: dict) -> dict:
    result = {
        "bytes": score.n_bytes,
        "logprob": score.logprob,
        "bits_per_byte": score.bits_per_byte,
        "impossible_byte": None,
        "K": params["K"],
        "prune_threshold": params["prune_threshold"],
        "pruned_mass": score.stats.pruned_mass,
        "heals": score.heals,
    }
    if score.impossible_at is not None:
        i = score.impossible_at
        result["impossible_byte"] = {
            "value": data[i],
            "hex": f"{data[i]:#04x}",
            "position": i,
            "after": _show(data[max(0, i - 20) : i]),
            "reason": "no tokenization of the text reads this byte with nonzero probability "
            + (
                "(no token of the vocabulary contains it)"
                if not _in_vocab(blm, data[i])
                else "(the beam's candidates could not read it, even after healing)"
            ),
        }
    return result


def _in_vocab(blm, byte: int) -> bool:
    return any(byte in bytes(t) for t in blm.model.lm.byte_vocab)


def _check_prompt(blm, prompt: bytes) -> None:
    """Name the first prompt byte that no token contains (the beam would read nothing)."""
    missing = set(prompt) - {b for t in blm.model.lm.byte_vocab for b in bytes(t)}
    if missing:
        i = min(prompt.index(b) for b in missing)
        raise CLIError(
            f"--prompt byte {prompt[i]:#04x} at position {i} (after {_show(prompt[max(0, i - 20) : i])!r}) "
            "is in no token of the model's vocabulary: no tokenization reads it"
        )


async def _next_byte(args) -> dict:
    from .byte_lm import ByteLM

    blm = ByteLM(_load(args), **_beam_params(args))
    prompt = _text_or_file(args.prompt)
    _check_prompt(blm, prompt)
    try:
        dist = await blm.next_byte(prompt)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    top = []
    for outcome, p in dist.top(args.top).items():
        if isinstance(outcome, str):  # "<EOS>"
            top.append({"byte": None, "text": outcome, "prob": p})
        else:
            top.append({"byte": outcome[0], "text": _show(outcome), "prob": p})
    return {"prompt": _show(prompt), "top": top}


async def _generate(args) -> dict:
    from .byte_lm import ByteLM

    blm = ByteLM(_load(args), **_beam_params(args))
    prompt = _text_or_file(args.prompt)
    _check_prompt(blm, prompt)
    before = _lm_counters(blm.model)
    start = time.perf_counter()
    try:
        out = await blm.generate(prompt, max_bytes=args.max_bytes, greedy=args.greedy, seed=args.seed)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    return {
        "prompt": _show(prompt),
        "text": _show(out),
        "bytes": len(out),
        "diagnostics": _diagnostics(blm.model, before, len(out), time.perf_counter() - start),
    }


COMMANDS = {"sample": _sample, "score": _score, "next-byte": _next_byte, "generate": _generate}


# ----------------------------------------------------------------------------- text output
def _on(diagnostics: dict) -> str:
    return f" on {diagnostics['device']}" if diagnostics.get("device") else ""


def _print_text(command: str, result: dict, out) -> None:
    d = result.get("diagnostics")
    if command == "sample":
        print(
            f"ESS {result['ess']:.2f} of {result['particles']} particles; "
            f"log marginal likelihood {result['log_ml']:.3f}",
            file=out,
        )
        if not result["samples"]:
            print("no particle completed within --max-bytes; try more bytes or particles", file=out)
        for s in result["samples"]:
            print(f"{s['weight']:8.4f}  {json.dumps(s['text'], ensure_ascii=False)}", file=out)
        pruned = max((s["pruned_mass"] for s in result["samples"]), default=0.0)
        print(
            f"# {d['lm_calls']} LM calls ({d['lm_calls_per_byte'] or 0:.2f}/byte), {d['lm_contexts']} contexts, "
            f"max pruned mass {pruned:.3g}, {d['seconds']:.1f} s{_on(d)}",
            file=out,
        )
    elif command == "score":
        files = result.get("files") or [result]
        for r in files:
            name = f"{r['file']}: " if "file" in r else ""
            bad = r["impossible_byte"]
            if bad is not None:
                print(
                    f"{name}{r['bytes']} bytes  log-prob -inf: byte {bad['hex']} at position {bad['position']} "
                    f"(after {bad['after']!r}) has probability 0: {bad['reason']}",
                    file=out,
                )
            else:
                print(
                    f"{name}{r['bytes']} bytes  log-prob {r['logprob']:.4f} nats  {r['bits_per_byte']:.4f} bits/byte",
                    file=out,
                )
        if "files" in result:
            print(
                f"total: {result['bytes']} bytes  log-prob {result['logprob']:.4f} nats  "
                f"{result['bits_per_byte']:.4f} bits/byte",
                file=out,
            )
        print(
            f"# {'max ' if len(files) > 1 else ''}pruned mass {max(r['pruned_mass'] for r in files):.3g}, heals {sum(r['heals'] for r in files)}, "
            f"{d['lm_calls']} LM calls ({d['lm_calls_per_byte'] or 0:.2f}/byte), {d['bytes_per_s'] or 0:.1f} B/s{_on(d)}",
            file=out,
        )
    elif command == "next-byte":
        for item in result["top"]:
            label = "<EOS>" if item["byte"] is None else json.dumps(item["text"], ensure_ascii=False)
            print(f"{item['prob']:8.4f}  {label}", file=out)
    else:
        print(result["text"], file=out)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    with _quiet_engines(args.verbose), _results_stdout() as out:
        try:
            result = asyncio.run(COMMANDS[args.command](args))
        except CLIError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        if args.json:
            print(json.dumps(_json_safe(result), indent=2, allow_nan=False, ensure_ascii=False), file=out)
        else:
            _print_text(args.command, result, out)
    return 0
