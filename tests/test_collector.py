"""tune_collector: what it freezes, the thresholds it sets, the freeze after the first LM calls;
the young threshold every TokenModel raises."""

import asyncio
import gc
import weakref

import pytest

from genlm_bytes_potential import collector
from genlm_bytes_potential.backends import MockTokenLM
from genlm_bytes_potential.lm_state import TokenModel

VOCAB = [b"a", b"b", b"ab", b" ", b"<eos>"]


def test_freezes_what_is_alive_and_raises_the_young_threshold(restore_collector):
    gc.set_threshold(700, 10, 10)
    made_before = [object()]
    collector.tune_collector(young_threshold=1234, settle_after=0)
    assert gc.get_threshold() == (1234, 10, 10)
    assert not any(o is made_before for o in gc.get_objects())  # frozen: no collection walks it
    assert collector._calls_until_settled == 0
    assert collector._unfreeze_registered  # unfrozen at exit, so that the interpreter finalizes them

    gc.set_threshold(99_999, 10, 10)  # the user's higher threshold is kept
    collector.tune_collector(young_threshold=1234, settle_after=0)
    assert gc.get_threshold() == (99_999, 10, 10)


def test_what_is_made_later_is_still_collected(restore_collector):
    collector.tune_collector(settle_after=0)

    class Cycle:
        pass

    later = Cycle()
    later.me = later
    gone = weakref.ref(later)
    del later
    gc.collect()
    assert gone() is None


def test_frozen_once_more_after_the_first_lm_calls(restore_collector):
    model = TokenModel(MockTokenLM(VOCAB, seed=1, eos_token_id=4))
    state = model.initial_state()
    collector.tune_collector(settle_after=3)
    for call in range(1, 6):
        kept = [object()]  # alive across the call: frozen by the call that settles, only by it
        state = model.extend(state, 0)  # a new context: one LM call
        asyncio.run(model.rows([state], True))
        assert model.stats.batch_calls == call
        walked = any(o is kept for o in gc.get_objects())  # the frozen generation is not listed
        assert walked == (call != 3)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_settings_are_named(bad, restore_collector):
    with pytest.raises(ValueError, match=f"young_threshold={bad!r}; expected an int >= 0"):
        collector.tune_collector(young_threshold=bad)
    with pytest.raises(ValueError, match=f"settle_after={bad!r}; expected an int >= 0"):
        collector.tune_collector(settle_after=bad)
    with pytest.raises(ValueError, match=f"young_threshold={bad!r}; expected an int >= 0"):
        collector.raise_young_threshold(bad)


def test_a_token_model_raises_the_young_threshold_and_keeps_a_higher_one(restore_collector):
    gc.set_threshold(700, 10, 10)
    TokenModel(MockTokenLM(VOCAB, seed=1, eos_token_id=4))
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, 10, 10)
    gc.set_threshold(collector.YOUNG_THRESHOLD + 1, 5, 5)
    TokenModel(MockTokenLM(VOCAB, seed=1, eos_token_id=4))
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD + 1, 5, 5)
