import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from strategies import EOS_BYTES, vocabularies

from genlm_bytes_potential.trie import EOS, TokenByteTrie


def brute_log_masses(trie, vocab, lp, with_eos):
    """float64 reference: sum of p over tokens in each node's subtree (by prefix)."""
    out = np.full((lp.shape[0], trie.n_nodes), -np.inf)
    eos = set(trie.eos_tokens) if with_eos else set()
    for n in range(trie.n_nodes):
        if n == trie.eos_node:
            toks = [t for t, b in enumerate(vocab) if b in eos]
        elif trie.leaf_token[n] >= 0:
            t = trie.leaf_token[n]
            toks = [] if vocab[t] in eos else [t]
        else:
            pre = trie.prefix_of[n]
            toks = [t for t, b in enumerate(vocab) if b and b.startswith(pre) and b not in eos]
            if n == trie.root:
                toks += [t for t, b in enumerate(vocab) if b in eos]
        if toks:
            out[:, n] = logsumexp(lp[:, toks], axis=1)
    return out


def structure_ok(trie, vocab):
    for n in range(trie.n_nodes):
        # Subtrees are contiguous: every node in [n, end) descends from n.
        for d in range(n + 1, trie.end[n]):
            a = d
            while a not in (-1, n):
                a = trie.parent[a]
            assert a == n


@settings(max_examples=60, deadline=None)
@given(
    vocab=vocabularies(), seed=st.integers(0, 2**16), with_eos=st.booleans(), spread=st.sampled_from([1.0, 50.0, 300.0])
)
def test_log_masses_match_brute_force(vocab, seed, with_eos, spread):
    trie = TokenByteTrie(vocab, [EOS_BYTES])
    rng = np.random.default_rng(seed)
    lp = rng.uniform(-spread, 0, size=(3, len(vocab)))
    lp[0, rng.integers(len(vocab))] = -700.0  # far below the largest: must not underflow
    lp[1, rng.integers(len(vocab))] = -np.inf  # a token of probability 0
    lp32 = lp.astype(np.float32)
    cases = [(lp, lp), (torch.tensor(lp), lp), (lp32, lp32.astype(np.float64))]
    for given_lp, exact_lp in cases:
        want = brute_log_masses(trie, vocab, exact_lp, with_eos)
        got = np.asarray(trie.log_masses(given_lp, with_eos))
        assert np.array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        # |log m - log m_ref| <= 1e-6 is relative error <= ~1e-6 on the masses
        assert np.max(np.abs(got[fin] - want[fin]), initial=0) <= 1e-6
    structure_ok(trie, vocab)


@settings(max_examples=60, deadline=None)
@given(
    vocab=vocabularies(), seed=st.integers(0, 2**16), with_eos=st.booleans(), spread=st.sampled_from([1.0, 50.0, 300.0])
)
def test_weight_rows_give_every_mass_as_a_segment_sum(vocab, seed, with_eos, spread):
    """Host rows hold token weights and a few cached masses; ``masses_at`` reads any node's
    mass from them (a sum over its subtree's columns), equal to the full pass's. A cached
    mass is its columns added in order, to the last bit, in the kernel's blocks of four
    rows as in the rows after them."""
    trie = TokenByteTrie(vocab, [EOS_BYTES])
    rng = np.random.default_rng(seed)
    lp = rng.uniform(-spread, 0, size=(6, len(vocab)))  # a block of four rows and two more
    lp[0, rng.integers(len(vocab))] = -700.0
    lp[1, rng.integers(len(vocab))] = -np.inf
    for given_lp in (lp, lp.astype(np.float32)):
        rows = np.array([7, 2, 5, 0, 1, 3])
        table = np.full((8, trie.row_width), np.nan)
        trie.weight_rows(given_lp, with_eos, table, rows)
        want, _ = trie.masses(given_lp, with_eos)
        for b, r in enumerate(rows):
            got = trie.masses_at(table, np.full(trie.n_nodes, r), np.arange(trie.n_nodes))
            np.testing.assert_allclose(got, want[b], rtol=1e-12, atol=0)
            assert np.array_equal(got == 0, want[b] == 0)
            for n in trie._cached_nodes:
                in_order = 0.0
                for x in table[r, trie.seg_lo[n] : trie.seg_hi[n]].tolist():
                    in_order += x
                assert table[r, trie.mass_col[n]] == in_order
    assert (trie.mass_col[trie.root] >= 0) and all(
        trie.mass_col[trie.child(np.array([0]), ord(v[:1]))] >= 0 for v in vocab if v
    )


@settings(max_examples=60, deadline=None)
@given(
    vocab=vocabularies(),
    paths=st.lists(st.one_of(st.none(), st.binary(max_size=8), st.sampled_from([b"ab", b"abcab", b"ba"])), max_size=5),
    width=st.integers(1, 12),
)
def test_path_nodes_walk_the_known_bytes(vocab, paths, width):
    """``path_nodes``: the root, then per byte the node of the prefix read so far and the
    leaves of the tokens spelled exactly by it, until no token continues or ``width``."""
    trie = TokenByteTrie(vocab, [EOS_BYTES])
    got = trie.path_nodes([None if p is None else memoryview(p) for p in paths], width)
    for path, row in zip(paths, got):
        want = [trie.root]
        for n in range(1, len(path or b"") + 1):
            node = trie.node_of(path[:n])
            leaves = list(trie.leaves_spelling(path[:n]) or [])
            if node < 0 or len(want) + 1 + len(leaves) > width:
                break
            want += [node, *leaves]
        assert row.tolist() == want + [-1] * (width - len(want))


def test_no_underflow_700_below_max():
    vocab = [b"a", b"ab", b"b"]
    trie = TokenByteTrie(vocab)
    lp = np.array([[0.0, -700.0, -700.0]])
    lm = trie.log_masses(lp, with_eos=False)[0]
    node_ab = trie.node_of(b"ab")
    node_b = trie.node_of(b"b")
    assert lm[node_ab] == pytest.approx(-700.0, rel=1e-12)
    assert lm[node_b] == pytest.approx(-700.0, rel=1e-12)
    assert lm[trie.node_of(b"a")] == pytest.approx(np.logaddexp(0, -700.0), abs=1e-12)


def test_torch_level_path_matches_numba_path():
    """The CUDA code path (a float64 sparse-dense product) run on CPU tensors."""
    rng = np.random.default_rng(0)
    vocab = [bytes(rng.integers(97, 100, size=rng.integers(1, 5)).tolist()) for _ in range(300)] + [EOS_BYTES]
    trie = TokenByteTrie(vocab, [EOS_BYTES])
    lp = torch.tensor(rng.normal(size=(4, len(vocab))) * 20)
    for with_eos in (True, False):
        scaled_t, shift_t = trie._masses_torch(lp, with_eos)
        scaled_n, shift_n = trie.masses(lp, with_eos)
        np.testing.assert_allclose(shift_t.numpy(), shift_n)
        np.testing.assert_allclose(scaled_t.numpy(), scaled_n, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(1)
    vocab = [bytes(rng.integers(97, 100, size=rng.integers(1, 5)).tolist()) for _ in range(300)] + [EOS_BYTES]
    trie = TokenByteTrie(vocab, [EOS_BYTES])
    lp = rng.normal(size=(4, len(vocab))) * 20
    got = trie.log_masses(torch.tensor(lp, device="cuda")).cpu().numpy()
    np.testing.assert_allclose(got, trie.log_masses(lp), rtol=1e-9)


def _graph_test_trie(seed: int):
    rng = np.random.default_rng(seed)
    vocab = [bytes(rng.integers(97, 100, size=rng.integers(1, 5)).tolist()) for _ in range(300)] + [EOS_BYTES]
    return TokenByteTrie(vocab, [EOS_BYTES]), rng


def _check_masses_into(trie, rng, device) -> None:
    """Batches of several sizes into scattered rows of a table: the rows written equal
    ``_masses_torch``'s (to float64 rounding: a sparse product's sums may run in another
    order from one call to the next, on a GPU or over several CPU threads), no other row
    changes, and the shifts are returned."""
    for B in (1, 3, 4, 9):
        lp = torch.tensor(rng.normal(size=(B, trie.vocab_size)) * 20, dtype=torch.float32, device=device)
        lp[0, :5] = float("-inf")
        table = torch.full((20, trie.n_nodes), float("nan"), dtype=torch.float64, device=device)
        rows = rng.permutation(20)[:B]
        for with_eos in (True, False):
            shift = trie._masses_into(lp, with_eos, table, rows)
            scaled_ref, shift_ref = trie._masses_torch(lp, with_eos)
            torch.testing.assert_close(table[torch.as_tensor(rows, device=device)], scaled_ref, rtol=1e-13, atol=0)
            assert torch.equal(shift, shift_ref)
        untouched = np.setdiff1d(np.arange(20), rows)
        assert torch.isnan(table[torch.as_tensor(untouched, device=device)]).all()


def test_masses_through_graphs_split_and_pad_batches(monkeypatch):
    """``_masses_into``'s buckets, pieces and copies, the capture replaced by an eager
    replay into static outputs (the CUDA graph itself is checked on a GPU below)."""
    import genlm_bytes_potential.trie as trie_module

    def eager_capture(masses_torch, rows, V, dtype, device, with_eos):
        inputs = torch.zeros((rows, V), dtype=dtype, device=device)
        scaled, shift = (torch.empty_like(t) for t in masses_torch(inputs, with_eos))

        def replay():
            s, sh = masses_torch(inputs, with_eos)
            scaled.copy_(s)
            shift.copy_(sh)

        return trie_module._MassGraph(replay, inputs, scaled, shift)

    monkeypatch.setattr(trie_module, "_capture_masses", eager_capture)
    monkeypatch.setattr(trie_module, "_GRAPH_ROWS", 4)
    trie, rng = _graph_test_trie(2)
    _check_masses_into(trie, rng, "cpu")
    assert sorted({k[2] for k in trie._mass_graphs}) == [1, 4]  # 3 and 9 padded to 4, 9 in pieces


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_masses_through_cuda_graphs_equal_the_operators():
    trie, rng = _graph_test_trie(3)
    _check_masses_into(trie, rng, "cuda")
    lp = torch.tensor(rng.normal(size=(5, trie.vocab_size)), dtype=torch.float32, device="cuda")
    graphed = torch.zeros((8, trie.n_nodes), dtype=torch.float64, device="cuda")
    trie.masses(lp, out=graphed, out_rows=np.arange(5))
    trie.cuda_graphs = False
    plain = torch.zeros_like(graphed)
    trie.masses(lp, out=plain, out_rows=np.arange(5))
    torch.testing.assert_close(graphed, plain, rtol=1e-13, atol=0)
    assert len(trie._mass_graphs) > 0


def test_duplicates_get_separate_leaves_and_eos_edge():
    vocab = [b"a", b"ab", b"a", EOS_BYTES]
    trie = TokenByteTrie(vocab, [EOS_BYTES])
    node_a = trie.node_of(b"a")
    assert trie.n_leaves[node_a] == 2
    assert sorted(trie.leaf_token[node_a + 1 : node_a + 3]) == [0, 2]
    assert trie.child(np.array([trie.root]), EOS)[0] == trie.eos_node
    assert trie.node_of(b"<e>") >= 0  # the EOS token is also text (for prefill)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="b'zz'"):
        TokenByteTrie([b"a"], [b"zz"])
    with pytest.raises(ValueError, match="empty"):
        TokenByteTrie([])
    trie = TokenByteTrie([b"a", b"b"])
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        trie.log_masses(np.zeros((1, 3)))


def test_tries_are_built_once_per_vocabulary_and_eos_set():
    from genlm_bytes_potential.lm_state import cached_trie

    vocab = [b"a", b"b", b"ab", b"ba", b"<e>"]
    trie = cached_trie(vocab, [b"<e>"])
    assert cached_trie(list(vocab), [b"<e>"]) is trie
    # the same bytes split into other tokens, another EOS set, another token: other tries
    for other, eos in (([b"ab", b"ab", b"b", b"a", b"<e>"], [b"<e>"]), (vocab, []), (vocab[:-1] + [b"<f>"], [b"<f>"])):
        assert cached_trie(other, eos) is not trie


def test_a_vocabulary_object_is_read_once_and_equal_vocabularies_share_a_trie():
    from genlm_bytes_potential.lm_state import cached_trie, vocabulary

    vocab = [bytearray(b"a"), b"b", b"ab", b"<e>"]
    first = vocabulary(vocab)
    assert first.tokens == [b"a", b"b", b"ab", b"<e>"] and all(type(t) is bytes for t in first.tokens)
    assert vocabulary(vocab) is first  # the same object: not read again
    assert vocabulary(list(vocab)) == first  # an equal vocabulary in another object: the same digest
    assert cached_trie(list(vocab), [b"<e>"]) is cached_trie(vocab, [b"<e>"])
    vocab.append(b"ba")  # a vocabulary that grew in place is read again
    assert vocabulary(vocab).tokens[-1] == b"ba" and cached_trie(vocab, [b"<e>"]).vocab_size == 5
