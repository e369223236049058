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

A setting ``draft:KD:W`` simulates another prefetcher (not built): a *draft-and-resync*
one. Whenever the exact beam asks for a context not computed yet (a forward pass), a draft
beam of width ``KD`` reads the text from the start up to ``W`` bytes past the exact beam's
byte, on the exact rows of the contexts computed so far and, for the others, on a *proxy*
row: that of the context ending at the same byte along one fixed tokenization of the text
(the tokenizer's encoding, each position's tail tokenized greedily by longest match). Every
context the draft asks for joins that pass. The proxies' rows cost one more pass (counted).
Only the counts are simulated: the draft reruns from the start at each pass (quadratic host
time), where a built one would carry on from the exact beam.

Rows come from a memo shared by all settings, so later settings cost only the beam's work.
The counts are priced as ``a`` per forward pass, ``b`` per context and ``c`` per byte
(``--cost``, in ms). The default fits the H200 whole-text W1 figures of session 14 (596
calls, ~30,000 contexts, 4.3 s) together with sessions 7 and 13 finding 8:128 no faster
than 4:64 there. Prints only; saves nothing.
"""

from __future__ import annotations

import argparse
import asyncio
from itertools import accumulate

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


async def count(lm: MemoLM, text: bytes, K: int, eos, lookahead: int, max_prefetch: int) -> dict:
    """One scoring run of ``text`` under a prefetch setting: its counts and log-prob."""
    from genlm_bytes_potential.byte_lm import ByteLM

    blm = ByteLM(lm, K=K, eos_tokens=eos, lookahead=lookahead)
    blm.model.max_prefetch = max_prefetch
    lm.new_run()
    score = await blm.score(text)
    return {"forwards": lm.forwards, "contexts": set(lm.computed), "logprob": score.logprob}


def proxy_contexts(lm: MemoLM, text: bytes, start: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per byte position ``p`` of ``text`` (``0..len(text)``), a context ``start`` followed by
    tokens spelling ``text[:p]``: the tokenizer's encoding of the text up to its last token
    boundary at or before ``p`` (greedy longest match without a tokenizer), then ``text``
    up to ``p`` by greedy longest match."""
    vocab = [bytes(t) for t in lm.byte_vocab]
    index = {t: i for i, t in enumerate(vocab) if t}
    longest = max(map(len, index))

    def greedy(data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            j = next(j for j in range(min(len(data), i + longest), i, -1) if data[i:j] in index)
            out.append(index[data[i:j]])
            i = j
        return out

    tok = lm.tokenizer
    encode = getattr(tok, "encode", None)
    spine = list(encode(text.decode("utf-8"), add_special_tokens=False)) if encode else greedy(text)
    ends = list(accumulate(len(vocab[t]) for t in spine))
    out, j = [], 0
    for p in range(len(text) + 1):
        while j < len(ends) and ends[j] <= p:
            j += 1
        q = ends[j - 1] if j else 0
        out.append(start + tuple(spine[:j]) + tuple(greedy(text[q:p])))
    return out


class _MemoView:
    """An LM answering from ``memo`` (its vocabulary and special tokens; no ``has_logprobs``,
    so a beam over it does not prefetch)."""

    def __init__(self, memo: MemoLM):
        self.memo = memo
        self.byte_vocab, self.tokenizer = memo.byte_vocab, memo.tokenizer
        self.eos_token_id, self.bos_token_id = memo.eos_token_id, memo.bos_token_id


class _DraftRows(_MemoView):
    """The draft's LM: the memo's row of a context computed in this run, else the proxy row
    of the byte position it ends at; ``asked`` records the contexts not computed yet."""

    def __init__(self, memo: MemoLM, proxies: list[tuple[int, ...]], n_start: int):
        super().__init__(memo)
        self.proxies, self.n_start = proxies, n_start
        self.asked: dict[tuple[int, ...], None] = {}

    async def batch_next_token_logprobs(self, token_ids_list) -> torch.Tensor:
        rows, vocab = self.memo._rows, self.byte_vocab
        out = []
        for c in map(token_tuple, token_ids_list):
            if c not in self.memo.computed:
                self.asked[c] = None
                c = self.proxies[sum(len(vocab[t]) for t in c[self.n_start :])]
            out.append(rows[c])
        return torch.stack(out).to(torch.float64)


class _Resync(_MemoView):
    """The exact beam's LM under the draft-and-resync prefetcher: a call with a context not
    computed yet runs the draft (``draft(pos)``: the contexts it asks for reading the text
    up to ``W`` bytes past byte ``pos``) and computes those with the call's own, in one pass."""

    def __init__(self, memo: MemoLM, draft):
        super().__init__(memo)
        self.draft, self.pos = draft, 0

    async def batch_next_token_logprobs(self, token_ids_list) -> torch.Tensor:
        keys = [token_tuple(c) for c in token_ids_list]
        if any(k not in self.memo.computed for k in keys):
            extra = await self.draft(self.pos)
            await self.memo.batch_next_token_logprobs(list(extra) + keys)
        return await self.memo.batch_next_token_logprobs(keys)


async def count_draft(memo: MemoLM, text: bytes, K: int, eos, draft_K: int, window: int) -> dict:
    """One scoring run of ``text`` under the draft-and-resync prefetcher (module docstring)."""
    from genlm_bytes_potential.byte_lm import ByteLM

    memo.new_run()
    start = ByteLM(memo, K=K, eos_tokens=eos).model.initial_state().tokens
    proxies = proxy_contexts(memo, text, tuple(start))
    await memo.batch_next_token_logprobs(list(dict.fromkeys(proxies)))

    async def draft(pos: int) -> dict:  # pos: bytes the exact beam has read
        rows = _DraftRows(memo, proxies, len(start))
        await ByteLM(rows, K=draft_K, eos_tokens=eos, lookahead=0).score(text[: pos + 1 + window])
        return rows.asked

    resync = _Resync(memo, draft)
    blm = ByteLM(resync, K=K, eos_tokens=eos, lookahead=0)
    score = await blm.score(text, on_byte=lambda n: setattr(resync, "pos", n))
    return {"forwards": memo.forwards, "contexts": set(memo.computed), "logprob": score.logprob}


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
        help="lookahead:max_prefetch, or draft:KD:W (the draft-and-resync simulation)",
    )
    p.add_argument("--cost", default="2.0,0.07,0.43", help="ms per forward pass, per context, per byte")
    args = p.parse_args(argv)
    a, b, c = (float(x) for x in args.cost.split(","))
    settings = [s.split(":") for s in args.settings]
    for s in settings:
        if len(s) != (3 if s[0] == "draft" else 2) or not all(x.isdigit() for x in s[s[0] == "draft" :]):
            p.error(f"setting {':'.join(s)!r}; expected lookahead:max_prefetch or draft:KD:W (ints)")
    lm, info = make_lm(args.model, vocab=args.vocab, backend=args.backend)
    memo = MemoLM(lm)
    text = heldout_text(args.bytes)

    async def run_all():
        asked = await count(memo, text, args.K, info["eos"], 0, 0)
        rows = [("0:0", asked)]
        for s in settings:
            if s[0] == "draft":
                r = await count_draft(memo, text, args.K, info["eos"], int(s[1]), int(s[2]))
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
