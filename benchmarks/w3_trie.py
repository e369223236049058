"""W3: trie masses, ours vs genlm-bytes' TokenByteTrie.

    python -m benchmarks.w3_trie            # full: 4 vocabularies x B in 1,4,16,64,256
    python -m benchmarks.w3_trie --quick    # fewer repetitions, B in 1,16,256
    python -m benchmarks.w3_trie --device cuda   # GPU run (default: cuda if available)

Both sides get the same ``[B, V]`` float32 token log-probabilities (as an LM returns):

* ours: ``TokenByteTrie.masses(logprobs, with_eos=True)`` -> float64 linear masses scaled
  per row (exact to ~depth ulps; what our beam consumes);
* anchor: ``genlm.bytes.trie.TokenByteTrie.batch_weight_sum(torch.exp(logprobs),
  mode=TrieMode.WITH_EOS)`` -> float32 linear masses (what ``LazyTrieState.materialize``
  calls, minus its final log).

A second pair times the full log-mass path: our ``log_masses`` vs the anchor's
``log(batch_weight_sum(exp(.)))``. Needs only torch, numpy, numba and genlm-bytes.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np
import torch

from benchmarks.common import (
    Stat,
    add_common_args,
    command_line,
    fmt_ratio,
    fmt_time,
    header,
    interleaved,
    md_table,
    ratio_stat,
    save_json,
    set_threads,
)

BATCHES = (1, 4, 16, 64, 256)
QUICK_BATCHES = (1, 16, 256)
VOCAB_NAMES = ("smollm2", "gpt2", "llama3", "qwen")


def _anchor_trie(vocab, eos, device):
    import warnings

    from genlm.backend.tokenization import Token
    from genlm.bytes.trie import TokenByteTrie as AnchorTrie

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AnchorTrie(
            decode=[Token(i, b) for i, b in enumerate(vocab)],
            device=device,
            eos_byte_strings=set(eos),
        )


def _our_trie(vocab, eos):
    from genlm_bytes_potential.trie import TokenByteTrie

    return TokenByteTrie(vocab, eos)


def agreement(ours, anchor, logprobs) -> dict:
    """Compare both tries' masses node by node (nodes matched by byte prefix; leaves by
    token id). Returns the largest relative difference over nodes holding at least 1e-6
    of their row's total mass, and how many nodes with positive exact mass the anchor's
    float32 sums report as 0 (underflow)."""
    from genlm.bytes.trie import TrieMode

    scaled, shift = ours.masses(logprobs, with_eos=True)
    if torch.is_tensor(scaled):
        scaled, shift = scaled.cpu().numpy(), shift.cpu().numpy()
    theirs = anchor.batch_weight_sum(torch.exp(logprobs), mode=TrieMode.WITH_EOS)
    theirs = theirs.double().cpu().numpy()
    # Our node -> anchor node.
    leaves = set(int(x) for x in anchor.token_id_to_leaf[:, 1])
    by_prefix = {tuple(p): n for n, p in anchor.node2prefix.items() if n not in leaves}
    ours_nodes, their_nodes = [], []
    for n in range(ours.n_nodes):
        t = ours.leaf_token[n]
        if t >= 0:
            m = int(anchor.token_id_to_leaf[t, 1])
        elif n == ours.eos_node:
            m = anchor.eos_node
        else:
            m = by_prefix[tuple(ours.prefix_of[n])]
        ours_nodes.append(n)
        their_nodes.append(m)
    ours_nodes, their_nodes = np.array(ours_nodes), np.array(their_nodes)
    exact = scaled[:, ours_nodes] * np.exp(shift)[:, None]
    other = theirs[:, their_nodes]
    if len(ours.eos_token_ids):
        # EOS tokens' own leaves: ours hold their mass out (0); the anchor's matrix drops
        # them too (their leaf row maps to the EOS node and the root only).
        pass
    root = exact[:, [0]]
    big = exact >= 1e-6 * root
    rel = np.abs(other - exact) / np.where(exact > 0, exact, 1.0)
    return {
        "max_rel_diff": float(rel[big].max()) if big.any() else 0.0,
        "anchor_underflow_nodes": int(((exact > 0) & (other == 0)).sum()),
        "nodes_compared": int(exact.size),
    }


def run(
    vocabs: dict, batches=BATCHES, reps=7, device="cpu", check=True, seed=0, build_reps=3, temperature=3.0, log=print
) -> list[dict]:
    """Time ours vs the anchor for each vocabulary and batch size.

    Args:
        vocabs: name -> (byte_vocab, eos_tokens).
        temperature: logits are ``N(0,1) * temperature`` before log-softmax.
    """
    from genlm.bytes.trie import TrieMode

    import genlm_bytes_potential.trie  # noqa: F401  (imports stay outside the build timing)

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    results = []
    for name, (vocab, eos) in vocabs.items():
        vocab, eos = list(vocab), list(eos)
        build = {"ours": [], "anchor": []}
        for _ in range(build_reps):
            gc.collect()
            t0 = time.perf_counter()
            ours = _our_trie(vocab, eos)
            build["ours"].append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            anchor = _anchor_trie(vocab, eos, device)
            build["anchor"].append(time.perf_counter() - t0)
        build = {k: Stat(v) for k, v in build.items()}
        log(
            f"[{name}] V={len(vocab)} nodes ours={ours.n_nodes} anchor={len(anchor.children)} "
            f"build ours={build['ours'].median:.2f}s anchor={build['anchor'].median:.2f}s"
        )
        gen = torch.Generator().manual_seed(seed)
        full = torch.log_softmax(torch.randn(max(batches), len(vocab), generator=gen) * temperature, dim=-1).to(device)
        agree = agreement(ours, anchor, full[: min(4, max(batches))]) if check else None
        if agree:
            log(f"[{name}] agreement {agree}")
        for B in batches:
            lp = full[:B].contiguous()
            fns = {  # the tries bound as defaults: the lambdas outlive this iteration's names
                "ours": lambda o=ours, lp=lp: o.masses(lp, with_eos=True),
                "anchor": lambda a=anchor, lp=lp: a.batch_weight_sum(torch.exp(lp), mode=TrieMode.WITH_EOS),
                "ours_log": lambda o=ours, lp=lp: o.log_masses(lp, with_eos=True),
                "anchor_log": lambda a=anchor, lp=lp: torch.log(
                    a.batch_weight_sum(torch.exp(lp), mode=TrieMode.WITH_EOS)
                ),
            }
            for fn in fns.values():  # warm-up (numba/JIT, caches, allocator)
                fn()
            st = interleaved(fns, reps, sync=sync, min_time=0.05)
            r = {
                "vocab": name,
                "V": len(vocab),
                "nodes": ours.n_nodes,
                "B": B,
                "ours": st["ours"].to_dict(),
                "anchor": st["anchor"].to_dict(),
                "ours_log": st["ours_log"].to_dict(),
                "anchor_log": st["anchor_log"].to_dict(),
                "speedup": ratio_stat(st["anchor"], st["ours"]),
                "speedup_log": ratio_stat(st["anchor_log"], st["ours_log"]),
                "build_ours": build["ours"].to_dict(),
                "build_anchor": build["anchor"].to_dict(),
                "agreement": agree,
            }
            results.append(r)
            log(
                f"[{name}] B={B:4d} ours {fmt_time(st['ours'])} ms  anchor "
                f"{fmt_time(st['anchor'])} ms  speedup {fmt_ratio(r['speedup'])}  "
                f"(log path {fmt_ratio(r['speedup_log'])})"
            )
        del ours, anchor, full
        gc.collect()
    return results


def render(meta: dict, results: list[dict], labels: dict, reps: int, target=3.0) -> str:
    _, md = header(
        "W3 trie masses",
        date=meta["date"],
        machine=meta["machine"],
        model=", ".join(labels.values()),
        backend="none (random log-probs)",
        device=meta["device"],
        extra=(
            f"- command: `{meta['command']}`; {reps} interleaved repetitions, "
            f"each ≥50 ms of back-to-back calls; threads: torch "
            f"{torch.get_num_threads()}, numba {meta.get('numba_threads')}\n"
            "- ours = `masses()` float64 exact (scaled linear); anchor = "
            "`batch_weight_sum(exp(lp), WITH_EOS)` float32 linear (sparse mm). "
            "`log` columns: full log-masses on both sides."
        ),
    )
    rows = []
    for r in results:

        def s(k):
            return f"{r[k]['median'] * 1e3:.3g} ({r[k]['min'] * 1e3:.3g}–{r[k]['max'] * 1e3:.3g})"

        ok = "✅" if r["speedup"]["median"] >= target else "❌"
        rows.append(
            [
                r["vocab"],
                f"{r['V']:,}",
                r["B"],
                s("ours"),
                s("anchor"),
                f"{fmt_ratio(r['speedup'])} {ok}",
                fmt_ratio(r["speedup_log"]),
            ]
        )
    md += "\n" + md_table(
        ["vocab", "V", "B", "ours ms (f64)", "anchor ms (f32)", "speedup", "speedup, log path"],
        rows,
    )
    build_rows, seen = [], set()
    for r in results:
        if r["vocab"] in seen:
            continue
        seen.add(r["vocab"])
        bo, ba = r["build_ours"], r["build_anchor"]
        ag = r["agreement"] or {}
        build_rows.append(
            [
                r["vocab"],
                f"{r['nodes']:,}",
                f"{bo['median']:.2f} ({bo['min']:.2f}–{bo['max']:.2f})",
                f"{ba['median']:.2f} ({ba['min']:.2f}–{ba['max']:.2f})",
                f"{ba['median'] / bo['median']:.1f}×",
                f"{ag.get('max_rel_diff', float('nan')):.1e}",
                ag.get("anchor_underflow_nodes", "–"),
            ]
        )
    md += "\nTrie build (s) and agreement (anchor f32 vs ours f64, nodes ≥1e-6 of row mass):\n\n"
    md += md_table(
        ["vocab", "nodes", "build ours s", "build anchor s", "ratio", "max rel diff", "anchor zeros where exact > 0"],
        build_rows,
    )
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 reps, B in 1,16,256")
    p.add_argument("--vocab", nargs="*", default=list(VOCAB_NAMES), choices=VOCAB_NAMES)
    p.add_argument("--batch", nargs="*", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-check", action="store_true", help="skip the node-by-node agreement")
    add_common_args(p)
    a = p.parse_args(argv)
    set_threads(a.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    batches = tuple(a.batch or (QUICK_BATCHES if a.quick else BATCHES))
    reps = a.reps or (3 if a.quick else 7)
    from benchmarks.vocabs import load_vocab

    vocabs, labels = {}, {}
    for n in a.vocab:
        v, e, label = load_vocab(n)
        vocabs[n] = (v, e)
        labels[n] = f"{label} ({len(v):,})"
    results = run(vocabs, batches=batches, reps=reps, device=device, check=not a.no_check)
    import numba

    meta, _ = header("W3", date=a.date, machine=a.machine, model="", backend="", device=device)
    meta.update(
        command=command_line("benchmarks.w3_trie", argv if argv is not None else sys.argv[1:]),
        numba_threads=numba.get_num_threads(),
        labels=labels,
        reps=reps,
    )
    md = render(meta, results, labels, reps)
    print(md)
    if not a.no_write:
        print("saved", save_json(meta, results))
    return results


if __name__ == "__main__":
    main()
