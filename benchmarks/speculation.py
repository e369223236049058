"""How many forward passes and contexts W1 scoring asks of the LM, per prefetch setting.

    python -m benchmarks.speculation --model smollm2 --bytes 600 --settings 4:64 6:96 8:128

A GPU run of W1 is bound by LM calls and by the contexts they compute (session 14 on the
H200: the host waited 3.3 ms for the forward pass of each of 596 calls on the whole text), and
prefetching trades one for the other. The counts depend on the model's distributions, not
on where it runs (up to its dtype's rounding), so they are measured here with the model on
the CPU; only their price depends on the device. For each
``lookahead:max_prefetch`` setting, one ``ByteLM.score`` run counts:

* forward passes: LM calls with a context the run has not computed yet (a call answered
  from the LM's cache costs none);
* contexts computed;
* precision: the share of those the beam itself asks for. The asked-for contexts are the
  ones a run without prefetching computes (prefetching never changes the beam).

A setting ``draft:W`` runs the draft prefetcher (``TokenModel.draft_window=W``, 16 by default);
``lookahead:max_prefetch`` settings rank guesses (``draft_window=0``).

Rows come from a memo shared by all settings, so later settings cost only the beam's work.
The counts are priced as ``a`` per forward pass, ``b`` per context and ``c`` per byte
(``--cost``, in ms). The default fits the H200 whole-text W1 figures of session 14 (596
calls, ~30,000 contexts, 4.3 s) together with sessions 7 and 13 finding 8:128 no faster
than 4:64 there. Prints only; saves nothing.
"""

from __future__ import annotations

import argparse
import asyncio

import torch

from benchmarks.lms import heldout_text, make_lm
from genlm_bytes_potential.backends.protocol import token_tuple


class MemoLM:
    """``lm``'s rows, computed once per context across runs (float32); ``has_logprobs``
    and the counters describe the current run only (``new_run``)."""

    def __init__(self, lm):
        self.lm = lm
        self.byte_vocab = lm.byte_vocab
        self.tokenizer = getattr(lm, "tokenizer", None)
        self.eos_token_id = getattr(lm, "eos_token_id", None)
        self.bos_token_id = getattr(lm, "bos_token_id", None)
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.new_run()

    def new_run(self) -> None:
        self.computed: set[tuple[int, ...]] = set()
        self.forwards = 0

    def has_logprobs(self, token_ids) -> bool:
        return token_tuple(token_ids) in self.computed

    async def batch_next_token_logprobs(self, token_ids_list) -> torch.Tensor:
        keys = [token_tuple(c) for c in token_ids_list]
        distinct = dict.fromkeys(keys)
        new = [k for k in distinct if k not in self.computed]
        if new:
            self.forwards += 1
            self.computed.update(new)
        todo = [k for k in distinct if k not in self._rows]
        if todo:
            rows = self.lm.batch_next_token_logprobs_sync(todo).to(torch.float32)
            self._rows.update(zip(todo, rows))
        return torch.stack([self._rows[k] for k in keys]).to(torch.float64)


async def count(lm: MemoLM, text: bytes, K: int, eos, lookahead: int, max_prefetch: int, draft_window: int = 0) -> dict:
    """One scoring run of ``text`` under a prefetch setting: its counts and log-prob."""
    from genlm_bytes_potential.byte_lm import ByteLM

    blm = ByteLM(lm, K=K, eos_tokens=eos, lookahead=lookahead, draft_window=draft_window)
    blm.model.max_prefetch = max_prefetch
    lm.new_run()
    score = await blm.score(text)
    return {"forwards": lm.forwards, "contexts": set(lm.computed), "logprob": score.logprob}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "mock"])
    p.add_argument("--vocab", default="model", choices=["model", "tiny"], help="mock only")
    p.add_argument("--backend", default="paged", choices=["paged", "hf"], help="real models only")
    p.add_argument("--bytes", type=int, default=600)
    p.add_argument("--K", type=int, default=8)
    p.add_argument(
        "--settings",
        nargs="+",
        default=["4:64", "6:96", "8:128"],
        help="lookahead:max_prefetch (ranked guesses), or draft:W (the draft prefetcher)",
    )
    p.add_argument("--cost", default="2.0,0.07,0.43", help="ms per forward pass, per context, per byte")
    args = p.parse_args(argv)
    a, b, c = (float(x) for x in args.cost.split(","))
    settings = [s.split(":") for s in args.settings]
    for s in settings:
        if len(s) != 2 or not all(x.isdigit() for x in s[s[0] == "draft" :]):
            p.error(f"setting {':'.join(s)!r}; expected lookahead:max_prefetch or draft:W (ints)")
    lm, info = make_lm(args.model, vocab=args.vocab, backend=args.backend)
    memo = MemoLM(lm)
    text = heldout_text(args.bytes)

    async def run_all():
        asked = await count(memo, text, args.K, info["eos"], 0, 0)
        rows = [("0:0", asked)]
        for s in settings:
            if s[0] == "draft":
                r = await count(memo, text, args.K, info["eos"], 4, 64, int(s[1]))
            else:
                r = await count(memo, text, args.K, info["eos"], int(s[0]), int(s[1]))
            rows.append((":".join(s), r))
        return asked["contexts"], rows

    asked, rows = asyncio.run(run_all())
    print(
        f"W1 K={args.K}, {len(text)} B of the held-out text, {info['model']} ({info['backend']}); cost a={a} b={b} c={c} ms"
    )
    print("| setting | forward passes | contexts | precision | priced B/s | log-prob |")
    print("|---|---|---|---|---|---|")
    for setting, r in rows:
        n = len(r["contexts"])
        seconds = 1e-3 * (a * r["forwards"] + b * n + c * len(text))
        precision = len(r["contexts"] & asked) / max(n, 1)
        print(
            f"| {setting} | {r['forwards']} | {n} | {precision:.2f} | {len(text) / seconds:.0f} | {r['logprob']:.6f} |"
        )


if __name__ == "__main__":
    main()
