"""Python's cyclic garbage collector, set for byte-level inference.

Byte-level inference makes many small containers that live a few steps (token contexts,
beams, the LM cache's nodes) next to several hundred thousand long-lived ones (torch,
transformers and the model; then the kernels, tries and CUDA graphs that the first calls
compile and build). With CPython's defaults a young collection runs every 700 container
allocations, so that objects living a few steps are promoted, and each full collection then
walks every long-lived object again. On an H200 with SmolLM2 (``paged``), a full collection
took 136-398 ms, once or twice per 128-particle regex SMC run of about a second, and the
collector took 0.34-0.76 s of a 4.4-5.4 s scoring run (benchmarks/HISTORY.md, session 13).

Every :class:`~genlm_bytes_potential.lm_state.TokenModel` raises the young generation's
threshold (:func:`raise_young_threshold`): a mock-LM SMC of 400 steps of 32 particles spent
0.73-0.84 s in collections with CPython's defaults and 0.13-0.16 s with the threshold raised
(2-core CPU; benchmarks/HISTORY.md, session 21). Objects are not frozen there: only
:func:`tune_collector` does that, for the processes that load their model through ``load_lm``.

:func:`tune_collector` (``load_lm`` calls it once the model is loaded):

1. collects, then freezes every object alive (``gc.freeze``: left out of every later
   collection, still freed by reference counting; unfrozen at exit, so that the interpreter
   finalizes them);
2. lets ``young_threshold`` container allocations pass between young collections
   (CPython's default is 700; a higher threshold set by the user is kept), so that what a
   step makes mostly dies before a collection sees it;
3. freezes once more after the process's next ``settle_after`` LM calls through a
   :class:`~genlm_bytes_potential.lm_state.TokenModel`, by when the first calls have
   compiled their kernels and built their tries.

Frozen objects that later become cyclic garbage stay until exit: the cost of leaving the
long-lived heap out of collections.
"""

from __future__ import annotations

import atexit
import gc

#: young-generation threshold ``tune_collector`` sets by default (CPython's is 700)
YOUNG_THRESHOLD = 50_000
#: LM calls after ``tune_collector`` at which it freezes once more, by default
SETTLE_AFTER = 16

_calls_until_settled = 0
_unfreeze_registered = False


def tune_collector(young_threshold: int = YOUNG_THRESHOLD, settle_after: int = SETTLE_AFTER) -> None:
    """Freeze what is alive now, raise the young generation's threshold to
    ``young_threshold`` (never lowering it), and freeze once more after the next
    ``settle_after`` LM calls (0: not again). See the module's docstring."""
    _check_count("settle_after", settle_after)
    raise_young_threshold(young_threshold)  # (checks it before anything is frozen)
    freeze_alive()
    global _calls_until_settled
    _calls_until_settled = settle_after


def raise_young_threshold(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Let ``young_threshold`` container allocations pass between young collections
    (CPython's default is 700); a higher threshold already set is kept. What a byte step
    makes then mostly dies by reference counting before a collection sees it, and is not
    promoted into the generations that full collections walk."""
    _check_count("young_threshold", young_threshold)
    young, middle, old = gc.get_threshold()
    if young < young_threshold:
        gc.set_threshold(young_threshold, middle, old)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}; expected an int >= 0")


def freeze_alive() -> None:
    """One full collection, then ``gc.freeze()`` (undone at exit)."""
    gc.collect()
    gc.freeze()
    global _unfreeze_registered
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)
        _unfreeze_registered = True


def lm_called() -> None:
    """Count one LM call (``TokenModel`` calls this); the last one ``tune_collector``
    waits for freezes what is alive."""
    global _calls_until_settled
    if _calls_until_settled:
        _calls_until_settled -= 1
        if not _calls_until_settled:
            freeze_alive()
