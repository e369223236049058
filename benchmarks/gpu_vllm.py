"""vLLM backend vs ``PagedTokenLM``, side by side in one process, with where the time goes.

    python -m benchmarks.gpu_vllm --models smollm2 llama8b --out gpu_vllm.json

Models: ``smollm2`` (the default SmolLM2-135M), ``llama8b`` (a random-init model of
Llama-3-8B's shape with SmolLM2's tokenizer, built on the machine: real speeds, not real
texts), ``tiny`` (2-layer smoke model, for a CPU check of this script). Both backends run
the model in ``--dtype`` (bf16 by default) and get the same workloads, alternating:

* W1: ``ByteLM(lm, K).score(text)``, the first ``--bytes`` bytes of ``heldout.txt``;
* W2: regex SMC, ``direct_token_sampler(ByteBeamPotential * BoolFSA)`` (the ``product``
  mode of ``benchmarks.w2_smc``), ``--particles`` particles, 24 bytes, K=4.

For the vLLM backend each run also reports, per byte: wall time; time inside
``LLMEngine.step`` (forward, sampler and our capture; engine thread); host time of the
capture (``CaptureLogprobs.apply``); time building and adding requests; engine steps and
requests; and the rest (event loop: beam, trie masses, potential, waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

import torch

from benchmarks.lms import heldout_text
from benchmarks.w1_score import score_ours
from benchmarks.w2_smc import smc_once

MODELS = ("smollm2", "llama8b", "tiny")


def build_llama8b(tokenizer_dir: str, dtype) -> tuple[str, object]:
    """A random-init Llama-3-8B-shaped model with SmolLM2's tokenizer, saved as an HF
    folder; returns (folder, the model on the GPU)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    path = os.path.join(tempfile.gettempdir(), "llama3-8b-shape-smollm2-tok")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path, model


def model_path(name: str, dtype):
    from benchmarks.lms import _tiny_model_dir
    from genlm_bytes_potential.models import default_model_dir

    if name == "smollm2":
        return str(default_model_dir()), None
    if name == "tiny":
        return _tiny_model_dir(), None
    return build_llama8b(str(default_model_dir()), dtype)


def load_pair(name: str, dtype, device: str, vllm_memory: float):
    """{"vllm": VLLMTokenLM, "paged": PagedTokenLM} on the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genlm_bytes_potential.backends.paged import PagedTokenLM
    from genlm_bytes_potential.models import load_lm

    t = time.perf_counter()
    path, model = model_path(name, dtype)
    built = time.perf_counter() - t
    t = time.perf_counter()
    opts = {"dtype": str(dtype).removeprefix("torch.")}
    if device.startswith("cuda"):
        opts["gpu_memory_utilization"] = vllm_memory
    vllm = load_lm(path, backend="vllm", **opts)
    vllm_start = time.perf_counter() - t
    t = time.perf_counter()
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    paged = PagedTokenLM(model, AutoTokenizer.from_pretrained(path))
    paged_start = time.perf_counter() - t
    return {"vllm": vllm, "paged": paged}, {"build_s": built, "vllm_start_s": vllm_start, "paged_start_s": paged_start}


def _counters(lm) -> dict:
    from genlm_bytes_potential.backends.vllm import CaptureLogprobs

    if not hasattr(lm, "engine_steps"):
        return {}
    return {
        "engine_s": lm.engine_time,
        "submit_s": getattr(lm, "submit_time", 0.0),
        "capture_s": CaptureLogprobs.stats["seconds"],
        "steps": lm.engine_steps,
        "requests": lm.stats["requests"],
        "cache_hits": lm.stats.get("cache_hits", 0),
    }


def _timed(lm, work) -> dict:
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
        r["per_byte_ms"] = {
            "wall": r["seconds"] * ms,
            "engine_step": d["engine_s"] * ms,
            "capture_host": d["capture_s"] * ms,
            "submit": d["submit_s"] * ms,
            "rest": (r["seconds"] - d["engine_s"] - d["submit_s"]) * ms,
        }
    return r


def w1(lm, text, K, eos):
    async def work():
        r = await score_ours(lm, text, K, eos)
        r["n_bytes"] = len(text)
        return r

    return work


def w2(lm, n, eos, seed=0):
    async def work():
        r = await smc_once("ours", lm, "regex", n, 24, 4, eos, seed, mode="product")
        r["n_bytes"] = r["bytes"]
        return r

    return work


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "llama8b"], choices=MODELS)
    p.add_argument("--bytes", type=int, default=400)
    p.add_argument("--K", type=int, nargs="+", default=[5, 8])
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
    p.add_argument("--out", default="gpu_vllm.json")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    text = heldout_text(a.bytes)
    rows, meta = (
        [],
        {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": a.dtype,
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
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for mi, name in enumerate(a.models):
        lms, info = load_pair(name, dtype, device, a.vllm_memory[min(mi, len(a.vllm_memory) - 1)])
        meta["models"][name] = info
        print(f"== {name}: {json.dumps(info)}", flush=True)
        vocab = lms["paged"].byte_vocab
        eos = [bytes(vocab[lms["paged"].tokenizer.eos_token_id])]
        jobs = [(f"W1 K={K}", lambda lm, K=K: w1(lm, text, K, eos)) for K in a.K]
        jobs += [(f"W2 regex N={n}", lambda lm, n=n: w2(lm, n, eos)) for n in a.particles]
        for _, make in jobs:  # warm-up: kernels, CUDA graphs of both backends
            for lm in lms.values():
                asyncio.run(make(lm)())
        for label, make in jobs:
            for rep in range(a.reps):
                order = ("vllm", "paged") if rep % 2 == 0 else ("paged", "vllm")
                for backend in order:
                    r = _timed(lms[backend], make(lms[backend]))
                    r.update(model=name, job=label, backend=backend, rep=rep)
                    rows.append(r)
                    extra = ""
                    if "per_byte_ms" in r:
                        pb = r["per_byte_ms"]
                        extra = (
                            f"  ms/B: wall {pb['wall']:.3f} step {pb['engine_step']:.3f} "
                            f"capture {pb['capture_host']:.3f} submit {pb['submit']:.3f} "
                            f"rest {pb['rest']:.3f}; steps {r['steps']} requests {r['requests']} "
                            f"cache hits {r['cache_hits']}"
                        )
                    lp = r.get("logprob", r.get("log_ml"))
                    print(
                        f"{name:8s} {label:14s} {backend:5s} {r['bytes_per_s']:8.1f} B/s  logp {lp:.3f}{extra}",
                        flush=True,
                    )
            save()
        for label, _ in jobs:
            med = {}
            for backend in ("vllm", "paged"):
                v = sorted(
                    r["bytes_per_s"]
                    for r in rows
                    if r["model"] == name and r["job"] == label and r["backend"] == backend
                )
                med[backend] = v[len(v) // 2]
            print(
                f"SUMMARY {name:8s} {label:14s} vllm {med['vllm']:8.1f}  paged {med['paged']:8.1f}  "
                f"ratio {med['vllm'] / med['paged']:.2f}",
                flush=True,
            )
        lms["vllm"].close()
        del lms
    meta["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    save()


if __name__ == "__main__":
    main()
