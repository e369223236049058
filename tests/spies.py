"""Spies the tests share: what a call did, recorded without changing what it returns."""


def record_read_copies(store) -> list:
    """Make ``store`` (a full-rows ``MassStore``) record the slots of every copy from its
    table that a read (``gather``) makes; returns the list they are appended to. Copies
    made outside reads (a new row's check, ``send_paths``) are not recorded."""
    copied, gather, copy = [], store.gather, store._copied

    def gather_spy(slot, node):
        store._copied = lambda s, n: copied.append(s) or copy(s, n)
        try:
            return gather(slot, node)
        finally:
            store._copied = copy

    store.gather = gather_spy
    return copied


def count_new_context_calls(lm) -> list[int]:
    """Make ``lm`` count its batch calls that ask for a context it was not asked for
    before in this count; returns a one-item list holding that count."""
    count, seen, inner = [0], set(), lm.batch_next_token_logprobs

    async def counting(contexts, lora_name=None):
        new = {tuple(c) for c in contexts} - seen
        count[0] += bool(new)
        seen.update(new)
        return await inner(contexts)

    lm.batch_next_token_logprobs = counting
    return count
