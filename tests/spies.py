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
