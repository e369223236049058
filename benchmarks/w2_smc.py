"""W2: byte-level SMC under a grammar, ours vs ByteLLM vs token-level PromptedLLM.

    python -m benchmarks.w2_smc                       # SmolLM2-135M, 8/32/128 particles
    python -m benchmarks.w2_smc --quick               # 8/32 particles, 16 bytes
    python -m benchmarks.w2_smc --model mock --mock-vocab tiny --particles 8
    python -m benchmarks.w2_smc --systems ours --cold   # a fresh process's first runs

Each system runs genlm-control's ``SMC(direct_token_sampler(target), critic=grammar)``
(``--mode product``: ``direct_token_sampler(target * grammar)``, no critic) with the same
seed, prompt, ESS threshold and grammar:

* ours:   target = ``ByteBeamPotential(lm, K=K, prompt=prompt)`` (ints 0..255);
* anchor: target = ``ByteLLM(lm, BeamParams(K=K))`` with the same prompt; the grammar is
  coerced to its ``bytes`` vocabulary (``f = lambda xs: list(b"".join(xs))``);
* token:  target = ``PromptedLLM(lm)`` (prompt tokenized); grammar coerced to tokens
  (``f = lambda ts: list(b"".join(ts))``); max length in tokens = max bytes / 3;
* free:   target = :class:`FreeBytes`, a byte potential that costs nothing (every byte and
  EOS weigh 1): genlm-control's sampler, SMC and the grammar alone, the ceiling any byte
  potential's run stays under (``--systems ours free``; not run by default).

Grammars: a regex (``BoolFSA.from_regex``) and a JSON schema (``JsonSchema``).
bytes/s = bytes in all final particles (EOS excluded) / wall seconds; ESS of the final
weights; "valid" = particles with finite weight.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
import warnings

import numpy as np
from genlm.control.potential.base import Potential

from benchmarks.common import (
    Stat,
    add_common_args,
    command_line,
    fmt_ratio,
    header,
    md_table,
    ratio_stat,
    save_json,
    set_threads,
    thread_counts,
)
from benchmarks.lms import make_lm, reset
from genlm_bytes_potential.tokens import BYTE_TABLES, byte_product

PARTICLES = (8, 32, 128)
QUICK_PARTICLES = (8, 32)
SYSTEMS = ("ours", "anchor", "token")
CEILING = "free"

TASKS = {
    "regex": {
        "prompt": b"Three fruits, comma separated, lowercase: ",
        "regex": r"[a-z]+(, [a-z]+){2}\.",
    },
    "json": {
        "prompt": b'A person as a JSON object with "name" and "age": ',
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
}


def grammar(task: str):
    from genlm.control import BoolFSA, JsonSchema

    t = TASKS[task]
    return BoolFSA.from_regex(t["regex"]) if "regex" in t else JsonSchema(t["schema"])


def _nbytes(ctx) -> int:
    n = 0
    for x in ctx:
        if isinstance(x, int):
            n += 1
        elif isinstance(x, (bytes, bytearray)):
            n += len(x)
        elif hasattr(x, "byte_string"):
            n += len(x.byte_string)
    return n


def _prompt_ids(lm, prompt: bytes) -> list[int]:
    tok = getattr(lm, "tokenizer", None)
    bos = getattr(lm, "bos_token_id", None)
    if bos is None and tok is not None:
        bos = getattr(tok, "bos_token_id", None)
    if tok is not None and hasattr(tok, "encode"):
        ids = list(tok.encode(prompt.decode("utf-8"), add_special_tokens=False))
    else:  # a vocabulary with every single byte as the token of the same id (mock)
        vocab = [bytes(t) for t in lm.byte_vocab]
        if any(vocab[b] != bytes([b]) for b in prompt):
            raise ValueError("no tokenizer and no byte-identity tokens: cannot encode the prompt")
        ids = list(prompt)
    return ([bos] if bos is not None else []) + ids


class FreeBytes(Potential):
    """A potential over our 256 byte tokens that costs nothing: ``prefix = complete = 0``
    and ``logw_next = 0`` for every byte and EOS. Its ``*`` is the byte potentials'
    (``byte_product``), so a run with it is genlm-control's sampler, SMC and the grammar
    (through the same grammar view as ours) alone."""

    def __init__(self):
        super().__init__(BYTE_TABLES.vocab_eos[:-1], tables=BYTE_TABLES)

    async def prefix(self, context):
        return 0.0

    async def complete(self, context):
        return 0.0

    async def logw_next(self, context):
        return self.make_lazy_weights(np.zeros(len(self.vocab_eos)))

    async def batch_prefix(self, contexts):
        return np.zeros(len(contexts))

    async def batch_complete(self, contexts):
        return np.zeros(len(contexts))

    async def batch_logw_next(self, contexts):
        return self.make_lazy_weights(np.zeros((len(contexts), len(self.vocab_eos))))

    def __mul__(self, other):
        return byte_product(self, other)


def _target(system, lm, K, eos, prompt):
    from genlm.bytes import BeamParams
    from genlm.control import ByteLLM, PromptedLLM

    from genlm_bytes_potential.potential import ByteBeamPotential

    if system == "ours":
        return ByteBeamPotential(lm, K=K, prompt=prompt, eos_tokens=list(eos))
    if system == "anchor":
        bl = ByteLLM(lm, BeamParams(K=K, eos_byte_strings=list(eos)))
        bl.set_prompt_from_str(prompt.decode("utf-8"))
        return bl
    if system == CEILING:
        return FreeBytes()
    if system == "token":
        return PromptedLLM(lm, prompt_ids=_prompt_ids(lm, prompt), eos_byte_strings=list(eos))
    raise ValueError(system)


def _coerced(g, system, target):
    if system in ("ours", CEILING):  # the grammar over our byte tokens: a view, no coerce
        from genlm_bytes_potential import as_byte_tokens

        return as_byte_tokens(g)
    return g.coerce(
        target, f=lambda xs: list(b"".join(x if isinstance(x, (bytes, bytearray)) else x.byte_string for x in xs))
    )


async def smc_once(system, lm, task, n_particles, max_bytes, K, eos, seed, mode="critic", ess_threshold=0.5) -> dict:
    from genlm.control import SMC, direct_token_sampler

    prompt = TASKS[task]["prompt"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = _target(system, lm, K, eos, prompt)
        g = _coerced(grammar(task), system, target)
        if mode == "product":
            smc = SMC(direct_token_sampler(target * g))
        else:
            smc = SMC(direct_token_sampler(target), critic=g)
        max_tokens = max_bytes if system != "token" else max(1, math.ceil(max_bytes / 3))
        random.seed(seed)
        np.random.seed(seed)
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            seqs = await smc(n_particles=n_particles, ess_threshold=ess_threshold, max_tokens=max_tokens)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            await smc.cleanup()
    lw = np.asarray(seqs.log_weights, dtype=float)
    nb = sum(_nbytes(c) for c in seqs.contexts)
    best = max(range(len(lw)), key=lambda i: lw[i]) if len(lw) else None
    sample = b""
    if best is not None:
        sample = b"".join(
            bytes([x])
            if isinstance(x, int)
            else (x if isinstance(x, (bytes, bytearray)) else getattr(x, "byte_string", b""))
            for x in seqs.contexts[best]
        )
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "bytes": nb,
        "longest": max((_nbytes(c) for c in seqs.contexts), default=0),
        "bytes_per_s": nb / dt,
        "ess": float(seqs.ess),
        "valid": int(np.isfinite(lw).sum()),
        "log_ml": float(seqs.log_ml),
        "max_tokens": max_tokens,
        "sample": sample.decode("utf-8", "replace")[:60],
    }


def _one(system, lm, task, n, max_bytes, K, eos, seed, mode, log):
    reset(lm)
    try:
        r = asyncio.run(smc_once(system, lm, task, n, max_bytes, K, eos, seed, mode))
    except Exception as e:  # noqa: BLE001 - a failing system is a result
        log(f"  {system:6s} {task} N={n}: failed {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    r.update(lm.summary())
    log(
        f"  {system:6s} {task:5s} N={n:3d}: {r['bytes_per_s']:8.1f} B/s  {r['seconds']:.2f}s  "
        f"ESS {r['ess']:.2f}  valid {r['valid']}/{n}  LM {r['batch_calls']}b+"
        f"{r['single_calls']}s calls/{r['contexts']} ctx  best {r['sample']!r}"
    )
    return r


def run(
    lm,
    eos,
    tasks=("regex", "json"),
    particles=PARTICLES,
    max_bytes=24,
    K=4,
    reps=1,
    seed=0,
    systems=SYSTEMS,
    mode="critic",
    anchor_max_particles=None,
    skip=(),
    log=print,
    cold=False,
) -> list[dict]:
    """``anchor_max_particles``: skip the anchor above this many particles. ``skip``:
    ``(system, task, n)`` triples: skip ``system`` on ``task`` above ``n`` particles. Runs
    grow ~linearly in particles and some take tens of minutes on a small CPU; skipped
    cells say so. ``cold``: no warm-up, so the first run of each particle count pays for
    what a user's first run in a fresh process does (numba, CUDA-graph captures of new
    batch shapes); run one system per process for a fair number."""
    caps = {(s, t): n for s, t, n in skip}
    if anchor_max_particles:
        for t in tasks:
            caps.setdefault(("anchor", t), anchor_max_particles)
    # Warm-up, untimed: JIT, first allocations, and per particle count the batch shapes
    # a run meets (PagedTokenLM captures a CUDA graph per shape bucket, keys included: warmed
    # up with 2 particles only, the first 32-particle run on an H200 took 0.55-0.75 s against
    # 0.31-0.40 s for the next two; over 8 bytes only, 32-particle runs of 32 bytes still
    # captured: 18.7 ms a step against 9.6). Ours and the free target warm up over the
    # whole length; the others, whose LM captures nothing and which take minutes a run
    # on a CPU, over 8 bytes.
    for n in particles if not cold else ():
        for system in systems:
            cap = caps.get((system, tasks[0]))
            if cap is None or n <= cap:
                warm = max_bytes if system in ("ours", CEILING) else min(8, max_bytes)
                _one(system, lm, tasks[0], n, warm, K, eos, seed, mode, lambda *_: None)
    results = []
    for task in tasks:
        for n in particles:
            runs = {s: [] for s in systems}
            for rep in range(reps):
                order = systems if rep % 2 == 0 else tuple(reversed(systems))
                for s in order:
                    cap = caps.get((s, task))
                    if cap is not None and n > cap:
                        runs[s].append({"error": f"skipped (> {cap} particles: time budget)"})
                        continue
                    runs[s].append(_one(s, lm, task, n, max_bytes, K, eos, seed + rep, mode, log))
            row = {"task": task, "particles": n, "max_bytes": max_bytes, "K": K}
            stats = {}
            for s in systems:
                ok = [r for r in runs[s] if "error" not in r]
                if not ok:
                    row[s] = {"errors": [r["error"] for r in runs[s]]}
                    continue
                stats[s] = Stat([r["bytes_per_s"] for r in ok])
                row[s] = {
                    "bytes_per_s": stats[s].to_dict(),
                    "seconds": Stat([r["seconds"] for r in ok]).to_dict(),
                    "ess": float(np.median([r["ess"] for r in ok])),
                    "valid": float(np.median([r["valid"] for r in ok])),
                    "bytes": float(np.median([r["bytes"] for r in ok])),
                    "lm_contexts": float(np.median([r["contexts"] for r in ok])),
                    "lm_calls": float(np.median([r["batch_calls"] + r["single_calls"] for r in ok])),
                    "sample": ok[0]["sample"],
                }
            for s in ("anchor", "token", CEILING):
                if "ours" in stats and s in stats:
                    # throughput ratio: ours / theirs (higher = ours faster; of the ceiling: <= 1)
                    row[f"vs_{s}"] = ratio_stat(stats["ours"], stats[s])
            results.append(row)
    return results


def render(meta, results) -> str:
    _, md = header(
        "W2 SMC",
        date=meta["date"],
        machine=meta["machine"],
        threads=meta.get("threads_rec"),
        threads_at_end=meta.get("threads_at_end"),
        model=meta["model"],
        backend=meta["backend"],
        device=meta.get("device") or "cpu",
        extra=(
            f"- command: `{meta['command']}`; mode {meta['mode']}; beam K="
            f"{meta['K']}; max {meta['max_bytes']} bytes (token-level: "
            f"{math.ceil(meta['max_bytes'] / 3)} tokens); ESS threshold 0.5; "
            f"{meta['reps']} repetition(s), seed {meta['seed']}\n"
            f"- regex `{TASKS['regex']['regex']}` after {TASKS['regex']['prompt']!r}; "
            f"JSON schema {{name: string, age: integer}} after "
            f"{TASKS['json']['prompt']!r}\n"
            "- B/s: bytes in the final particles per wall second (median "
            "(min–max) over repetitions); ratio = ours B/s ÷ theirs; valid = "
            "particles with finite final weight"
        ),
    )
    rows = []
    ceiling = any(CEILING in r for r in results)
    for r in results:

        def cell(s):
            x = r.get(s)
            if x is None:
                return "–"
            if "bytes_per_s" not in x:
                errs = "; ".join(x["errors"])[:60]
                return errs if errs.startswith("skipped") else "failed: " + errs
            b = x["bytes_per_s"]
            return f"{b['median']:.1f} ({b['min']:.1f}–{b['max']:.1f}); ESS {x['ess']:.1f}; valid {x['valid']:.0f}"

        rows.append(
            [
                r["task"],
                r["particles"],
                cell("ours"),
                cell("anchor"),
                cell("token"),
                fmt_ratio(r["vs_anchor"]) if "vs_anchor" in r else "–",
                fmt_ratio(r["vs_token"]) if "vs_token" in r else "–",
            ]
            + ([cell(CEILING), fmt_ratio(r[f"vs_{CEILING}"]) if f"vs_{CEILING}" in r else "–"] if ceiling else [])
        )
    heads = ["grammar", "particles", "ours", "anchor ByteLLM", "token PromptedLLM", "ours/anchor", "ours/token"]
    if ceiling:
        heads += ["free target (genlm-control alone)", "ours/free"]
    md += "\n" + md_table(heads, rows)
    samples = [
        f"{r['task']} N={r['particles']}: ours {r['ours'].get('sample', '')!r}"
        for r in results
        if isinstance(r.get("ours"), dict)
    ]
    if samples:
        md += "\nHighest-weight particle (ours): " + "; ".join(samples[:4]) + "\n"
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8/32 particles, 16 bytes")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "mock"])
    p.add_argument("--mock-vocab", default="model", choices=["model", "tiny"])
    p.add_argument("--particles", nargs="*", type=int, default=None)
    p.add_argument("--task", nargs="*", default=["regex", "json"], choices=list(TASKS))
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=[*SYSTEMS, CEILING])
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--mode", default="critic", choices=["critic", "product"])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--anchor-max-particles", type=int, default=None)
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="SYSTEM:TASK:N",
        help="skip SYSTEM on TASK above N particles (N=0: always)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold", action="store_true", help="no warm-up runs: a fresh process's first runs")
    p.add_argument("--backend", default="hf", choices=["hf", "paged"], help="our LM backend, shared by all systems")
    p.add_argument("--device", default=None, help="model device (e.g. cuda)")
    p.add_argument("--dtype", default=None, help="model dtype (e.g. bfloat16)")
    add_common_args(p)
    a = p.parse_args(argv)
    threads = set_threads(a.threads)
    particles = tuple(a.particles or (QUICK_PARTICLES if a.quick else PARTICLES))
    max_bytes = a.max_bytes or (16 if a.quick else 24)
    opts = {k: v for k, v in (("device", a.device), ("dtype", a.dtype)) if v is not None}
    lm, info = make_lm(a.model, vocab=a.mock_vocab, backend=a.backend, **opts)
    results = run(
        lm,
        info["eos"],
        tasks=tuple(a.task),
        particles=particles,
        max_bytes=max_bytes,
        K=a.K,
        reps=a.reps,
        seed=a.seed,
        systems=tuple(a.systems),
        mode=a.mode,
        anchor_max_particles=a.anchor_max_particles,
        skip=[(x.split(":")[0], x.split(":")[1], int(x.split(":")[2])) for x in a.skip],
        cold=a.cold,
    )
    meta, _ = header(
        "W2",
        date=a.date,
        machine=a.machine,
        model=info["model"],
        backend=info["backend"],
        device=a.device or "cpu",
        threads=threads,
    )
    meta["threads_rec"] = threads
    meta["threads_at_end"] = thread_counts()
    meta.update(
        command=command_line("benchmarks.w2_smc", argv if argv is not None else sys.argv[1:]),
        mode=a.mode,
        K=a.K,
        max_bytes=max_bytes,
        reps=a.reps,
        seed=a.seed,
        device=a.device,
        cold=a.cold,
    )
    md = render(meta, results)
    print(md)
    if not a.no_write:
        print("saved", save_json(meta, results))
    return results


if __name__ == "__main__":
    main()
