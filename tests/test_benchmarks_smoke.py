"""Smoke runs of every benchmark workload at toy scale (mock LM, synthetic vocabulary).

They check that the harness runs ours and the anchor end to end and that its results,
markdown and plots are well-formed. No timing assertions: a benchmark is not a test.
"""

import asyncio
import json
import math

import numpy as np
import pytest

from benchmarks import (
    common,
    host_cost,
    memory,
    paged_layouts,
    speculation,
    w1_batch,
    w1_score,
    w2_smc,
    w3_trie,
    w4_floor,
)
from benchmarks.lms import RecordingLM, heldout_text, make_lm, reset
from benchmarks.vocabs import bytes_to_unicode, tiny_vocab


def _is_stat(d):
    return {"median", "min", "max"} <= set(d) and d["min"] <= d["median"] <= d["max"]


@pytest.fixture
def mock_lm():
    lm, info = make_lm("mock", vocab="tiny")
    assert isinstance(lm, RecordingLM)
    return lm, info


def test_common_stats(tmp_path):
    s = common.Stat([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 3.0)
    r = common.ratio_stat(common.Stat([4.0, 2.0]), common.Stat([2.0, 1.0]))
    assert r == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert common.time_call(lambda: None, min_time=0.0) >= 0
    assert len(bytes_to_unicode()) == 256


def test_report_pages(tmp_path):
    """BENCHMARKS.md shows the newest run of each group (a partial re-run beside the full run),
    HISTORY.md every run and keeps its hand-written notes; both layouts are read."""
    from benchmarks import report

    s = {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    side = {"bytes_per_s": 20.0, "bytes_per_s_min": 10.0, "bytes_per_s_max": 30.0, "bits_per_byte": 1.5}
    w1 = [{"K": k, "n_bytes": 64, "ours": side, "anchor": side, "speedup": s} for k in (1, 4)]
    meta = {
        "workload": "W1",
        "date": "2026-01-01",
        "machine": "m",
        "model": "SmolLM2",
        "backend": "hf",
        "device": "cpu",
        "commit": "abc",
        "command": "python -m benchmarks.w1_score",
    }
    for stamp, res in (("20260101T000000", w1), ("20260102T000000", w1[:1]), ("20260103T000000", w1)):
        common.save_json(dict(meta, commit=stamp[6:8]), res, name=f"w1-cpu-{stamp}.json", out_dir=tmp_path)
    rows = [
        {"name": n, "K": 5, "rep": rep, "n_bytes": 400, "bytes_per_s": b * (1 + rep), "bits_per_byte": 1.27}
        for rep in (0, 1)
        for n, b in (("ours", 600.0), ("anchor", 20.0))
    ]
    common.save_json(
        dict(meta, device="cuda", machine="16-core CPU, GPU NVIDIA H200", commit="gpu"),
        rows,
        name="w1-cuda-20260104T000000.json",
        out_dir=tmp_path,
        key="rows",
    )
    common.save_json(dict(meta, workload="W9"), [{"x": 1}], name="w9-cpu-20260105T000000.json", out_dir=tmp_path)
    history = tmp_path / "HISTORY.md"
    history.write_text("old generated part\n" + report.NOTES_MARKER + "\n\nhand-written note\n")
    bench = tmp_path / "BENCHMARKS.md"
    report.write_pages(tmp_path, bench, history, plot_dir=tmp_path, plots=False)
    doc = bench.read_text()
    assert "`03`" in doc and "`01`" not in doc and "`02`" not in doc  # day 3 covers days 1 and 2
    assert "NVIDIA H200" in doc and "| **30.00×** |" in doc  # ours / anchor, equal in each repetition
    assert "## W9" in doc and "not read: KeyError" in doc  # a layout without a reader is shown, not fatal
    hist = history.read_text()
    assert all(f"w1-cpu-2026010{d}T000000.json" in hist for d in (1, 2, 3))
    assert hist.endswith("hand-written note\n") and "old generated part" not in hist
    # a partial re-run does not replace the full run before it
    (tmp_path / "w1-cpu-20260103T000000.json").unlink()
    report.write_pages(tmp_path, bench, history, plots=False)
    doc = bench.read_text()
    assert "`01`" in doc and "`02`" in doc


def test_w3_trie_smoke(tmp_path):
    vocab, eos = tiny_vocab()
    res = w3_trie.run({"tiny": (vocab, eos)}, batches=(1, 3), reps=1, build_reps=1, log=lambda *_: None)
    assert [r["B"] for r in res] == [1, 3]
    for r in res:
        for k in ("ours", "anchor", "ours_log", "anchor_log", "build_ours", "build_anchor"):
            assert _is_stat(r[k]) and r[k]["median"] > 0
        assert r["speedup"]["median"] > 0
        # ours (float64) and genlm-bytes (float32) compute the same masses
        assert r["agreement"]["max_rel_diff"] < 1e-4
        assert r["agreement"]["anchor_underflow_nodes"] == 0
    meta, _ = common.header("W3", date="2026-01-01", machine="m", model="", backend="")
    meta.update(command="x", numba_threads=1, labels={"tiny": "tiny"}, reps=1)
    md = w3_trie.render(meta, res, {"tiny": "tiny"}, reps=1)
    assert md.count("| tiny |") == 3 and "2026-01-01" in md
    path = common.save_json(meta, res, out_dir=tmp_path)
    assert json.loads(path.read_text())["results"][0]["vocab"] == "tiny"


def test_w1_score_smoke(mock_lm):
    lm, info = mock_lm
    text = heldout_text(24)
    assert 20 <= len(text) <= 24
    res = w1_score.run(lm, info["eos"], text, Ks=(1, 3), reps=1, warm=False, log=lambda *_: None)
    assert [r["K"] for r in res] == [1, 3]
    for r in res:
        for side in ("ours", "anchor"):
            assert r[side]["bytes_per_s"] > 0, r[side]
            assert math.isfinite(r[side]["bits_per_byte"]) and r[side]["bits_per_byte"] > 0
            assert r[side]["lm_contexts"] >= 1
        assert r["speedup"]["median"] > 0
    meta = {
        "date": "d",
        "machine": "m",
        "model": info["model"],
        "backend": info["backend"],
        "command": "c",
        "text": "t",
    }
    assert "| 3 |" in w1_score.render(meta, res, reps=1)


def test_w1_batch_smoke(mock_lm, tmp_path):
    """The documents scored one at a time and in lockstep: equal totals (an exact LM), fewer
    LM calls together; the saved run is read by the report."""
    from benchmarks import report

    lm, info = mock_lm
    text = heldout_text(60)
    assert b"".join(w1_batch.documents(text, 3)) == text
    res = w1_batch.run(lm, info["eos"], text, docs_counts=(1, 3), K=3, reps=1, log=lambda *_: None)
    assert [r["docs"] for r in res] == [1, 3]
    for r in res:
        assert r["one_by_one"]["logprob"] == r["batch"]["logprob"] and math.isfinite(r["batch"]["logprob"])
        assert r["one_by_one"]["bytes_per_s"] > 0 and r["speedup"] > 0
    assert res[1]["batch"]["lm_calls"] < res[1]["one_by_one"]["lm_calls"]
    meta = {
        "workload": "W1 batch",
        "date": "d",
        "machine": "m",
        "model": info["model"],
        "backend": "mock",
        "device": "cpu",
    }
    path = common.save_json(meta, res, out_dir=tmp_path)
    assert path.name.startswith("w1-batch-cpu-")  # the workload's space as a dash
    run = report.read_run(path)
    assert run.workload == "W1 batch" and "| 3 |" in run.table and "3 docs" in run.headline


def test_w2_smc_smoke(mock_lm, monkeypatch):
    lm, info = mock_lm
    res = w2_smc.run(lm, info["eos"], tasks=("regex",), particles=(2,), max_bytes=3, K=2, log=lambda *_: None)
    (row,) = res
    assert row["task"] == "regex" and row["particles"] == 2
    for s in w2_smc.SYSTEMS:
        x = row[s]
        assert "bytes_per_s" in x, x  # every system ran
        assert _is_stat(x["bytes_per_s"]) and 0 <= x["ess"] <= 2 and 0 <= x["valid"] <= 2
    meta = {
        "date": "d",
        "machine": "m",
        "model": "mock",
        "backend": "mock",
        "command": "c",
        "mode": "critic",
        "K": 2,
        "max_bytes": 3,
        "reps": 1,
        "seed": 0,
    }
    assert "| regex | 2 |" in w2_smc.render(meta, res)
    # cold: the timed runs only, no warm-up run
    runs = []
    one = w2_smc._one
    monkeypatch.setattr(w2_smc, "_one", lambda *a: runs.append(a[0]) or one(*a))
    for cold in (False, True):
        w2_smc.run(lm, info["eos"], tasks=("regex",), particles=(2,), max_bytes=3, K=2, systems=("ours",), cold=cold)
    assert runs == ["ours", "ours", "ours"]  # warm-up and run, then the run alone
    # the ceiling: genlm-control with a target that costs nothing, beside ours
    (row,) = w2_smc.run(
        lm,
        info["eos"],
        tasks=("regex",),
        particles=(2,),
        max_bytes=3,
        K=2,
        systems=("ours", "free"),
        log=lambda *_: None,
    )
    assert row["free"]["bytes"] > 0 and "vs_free" in row
    assert "ours/free" in w2_smc.render(meta, [row])


def test_w4_floor_smoke(mock_lm):
    lm, info = mock_lm
    res = w4_floor.run(
        lm,
        info["eos"],
        text=heldout_text(12),
        Ks=(2,),
        smc=(("regex", 2),),
        max_bytes=3,
        smc_K=2,
        reps=1,
        log=lambda *_: None,
    )
    assert len(res) == 2
    for r in res:
        assert r["ours_s"]["median"] > 0 and r["floor_s"]["median"] > 0
        assert r["calls"]["batch_calls"] >= 1 and r["calls"]["single_calls"] == 0
    # The replay makes exactly the recorded calls.
    reset(lm)
    w4_floor._w1(lm, info["eos"], heldout_text(12), 2)
    calls = list(lm.calls)
    inner = lm.inner
    inner.reset_counters()
    import asyncio

    asyncio.run(w4_floor.replay(lm, calls))
    assert inner.batch_calls == len(calls)
    assert [tuple(c) for c in inner.requests] == [c for _, cs, _ in calls for c in cs]


def test_host_cost_smoke():
    """The mock SMC's shares add up; scoring reports both sides' own cost and contexts."""
    smc = asyncio.run(host_cost.smc_part(steps=12, n=4))
    assert smc["ours_us_per_particle_byte"] + smc["lm_us_per_particle_byte"] == pytest.approx(
        smc["us_per_particle_byte"]
    )
    assert 0 <= smc["collector_us_per_particle_byte"] <= smc["ours_us_per_particle_byte"]
    (score,) = asyncio.run(host_cost.score_part(nbytes=12, Ks=(2,)))
    assert score["K"] == 2 and score["ours_contexts"] > 0 and score["bytelm_contexts"] > 0
    assert 0 < score["ours_own_us_per_byte"] and 0 < score["bytelm_own_us_per_byte"]
    assert score["own_ratio"] == pytest.approx(score["bytelm_own_us_per_byte"] / score["ours_own_us_per_byte"])


def test_memory_smoke(capsys):
    memory.main(["--particles", "4", "--bytes-per-particle", "40", "--every", "40", "--no-write"])
    out = capsys.readouterr().out
    assert "bytes in" in out and "the mock's own log-prob memo holds" in out


def test_speculation_counts(capsys):
    """Prefetching computes every context the beam asks for, in fewer forward passes, and
    leaves the score as it is; the table prints a row per setting."""
    lm, info = make_lm("mock", vocab="tiny")
    memo = speculation.MemoLM(lm)
    text = heldout_text(120)

    async def both():
        return [await speculation.count(memo, text, 8, info["eos"], *s) for s in ((0, 0), (4, 64))]

    plain, prefetched = asyncio.run(both())
    assert plain["contexts"] <= prefetched["contexts"]
    assert prefetched["forwards"] < plain["forwards"] == 1 + len(text)  # the prompt's row, then one a byte
    assert prefetched["logprob"] == plain["logprob"]
    drafted = asyncio.run(speculation.count(memo, text, 8, info["eos"], 4, 64, draft_window=16))
    assert plain["contexts"] <= drafted["contexts"] and drafted["logprob"] == plain["logprob"]
    assert drafted["forwards"] < prefetched["forwards"]
    speculation.main(["--model", "mock", "--vocab", "tiny", "--bytes", "60", "--settings", "4:64", "draft:16"])
    out = capsys.readouterr().out
    assert "| 0:0 |" in out and "| 4:64 |" in out and "| draft:16 |" in out


def test_paged_layouts_counts(capsys):
    """W1 on the paged backend: the beam's one-token batches take the tree layout, reading
    fewer keys than a row per context; every asked-for context is counted by its tokens past
    the canonical tokenization."""
    paged_layouts.main(["--model", "tiny", "--bytes", "60"])
    out = capsys.readouterr().out
    tree = next(line for line in out.splitlines() if line.startswith("| tree |"))
    keys, row_keys = (float(x) for x in tree.strip("| ").split(" | ")[-2:])
    assert keys < row_keys
    asked = int(out.split(" contexts asked for")[0].split()[-1])
    shares = [
        line.split(" | ")[1]
        for line in out.splitlines()
        if line.startswith(("| 0 |", "| 1-", "| 5-", "| 17-", "| 65+"))
    ]
    assert sum(map(int, shares)) == asked > 0
    assert paged_layouts.canonical_tails([(1, 5, 6, 7), (1, 5, 9), (1,)], [5, 6]) == {(1, 4): 2, (0, 0): 1}


def test_plots_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    s = {"median": 1.0, "min": 0.5, "max": 2.0, "n": 2}
    w3 = [{"vocab": "v", "V": 10, "B": b, "ours": s, "anchor": s} for b in (1, 4)]
    w1 = [
        {
            "K": k,
            "ours": {"bytes_per_s": 2.0, "bytes_per_s_min": 1.0, "bytes_per_s_max": 3.0, "bits_per_byte": 1.5},
            "anchor": {"errors": ["x"]},
        }
        for k in (1, 2)
    ]
    w2 = [{"task": "regex", "particles": n, "ours": {"bytes_per_s": s}, "anchor": {"errors": []}} for n in (2, 8)]
    meta = {"device": "cpu", "machine": "m", "model": "mock"}
    for wl, res in (("w1", w1), ("w2", w2), ("w3", w3)):
        (tmp_path / f"{wl}-cpu-20260101T000000.json").write_text(
            json.dumps({"meta": dict(meta, workload=wl), "results": res})
        )
    paths = plots.make_all("cpu", results_dir=tmp_path, out_dir=tmp_path)
    assert len(paths) == 4
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite(1.0)


def test_gpu_session_on_cpu(tmp_path):
    """The GPU W1 session runs on the CPU too (SmolLM2 fp32, a few bytes): every row
    scores the text, and ours agrees with ByteLLM on the same LM."""
    from benchmarks import gpu_session

    out = tmp_path / "w1.json"
    rows = gpu_session.main(
        [
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--bytes",
            "24",
            "--K",
            "2",
            "--reps",
            "1",
            "--rows",
            "ours",
            "anchor_t0",
            "anchor_on_our_lm",
            "--out",
            str(out),
            "--no-write",
        ]
    )
    by = {r["name"]: r for r in rows}
    assert set(by) == {"ours", "anchor_t0", "anchor_on_our_lm"}
    assert all(r["bytes_per_s"] > 0 and math.isfinite(r["bits_per_byte"]) for r in rows)
    assert abs(by["ours"]["bits_per_byte"] - by["anchor_on_our_lm"]["bits_per_byte"]) < 0.05
    assert json.loads(out.read_text())["meta"]["device"] == "cpu"


def test_gpu_tests_records_passes_and_failures(tmp_path):
    """The GPU test runner on the CPU: a real test that passes, a failing one and one that
    outlives the run's time, each group its own pytest process; the counts, the failure's
    first line and, for the group cut off, the tests it finished are recorded and rendered."""
    from dataclasses import asdict

    from benchmarks import gpu_tests, report

    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n")
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\n\ndef test_quick():\n    pass\n\n\ndef test_slow():\n    time.sleep(600)\n")
    results = gpu_tests.main(
        [
            "--group",
            "tests/test_trie.py -k test_no_underflow_700_below_max",
            "--group",
            str(failing),
            "--group",
            str(slow),
            "--timeout",  # room for three pytest start-ups at once on a loaded 2-core machine
            "45",
            "--no-write",
        ]
    )
    trie, bad, cut = results
    assert (trie.passed, trie.failed, trie.timed_out) == (1, 0, False)
    assert (bad.passed, bad.failed) == (1, 1)
    assert bad.failures[0]["test"].endswith("test_bad") and "arithmetic" in bad.failures[0]["message"]
    assert (cut.passed, cut.failed, cut.timed_out) == (1, 0, True) and cut.seconds < 90
    assert cut.returncode != -9  # interrupted, not killed: also where SIGINT is ignored (a background job)
    head, table, _ = report._gpu_tests({}, [asdict(r) for r in results])
    assert head == "3 passed, 1 failed, 0 skipped (a group timed out)" and "arithmetic" in table


def test_w2_split_accounts_for_a_real_smc_run_and_unwraps():
    """``gpu_profile.w2_split`` on the mock LM: a real product-mode regex SMC run whose
    parts (ours, the LM inside ours, the grammar, the rest) lie within its wall time,
    concurrent calls counted once; every wrapped method is the original again afterwards."""
    from benchmarks.gpu_profile import w2_split
    from benchmarks.lms import make_lm
    from genlm_bytes_potential import potential, tokens

    methods = [(cls, m) for cls in (potential.ByteBeamPotential, tokens.ByteTokenView) for m in ("batch_logw_next",)]
    before = [vars(cls)[m] for cls, m in methods]
    lm, info = make_lm("mock", vocab="tiny")
    r = w2_split(lm, info["eos"], 4, max_bytes=8)
    assert [vars(cls)[m] for cls, m in methods] == before and "batch_next_token_logprobs" not in vars(lm)
    assert r["bytes"] > 0 and 0 < r["steps"] <= 8
    assert r["total"] > r["ours"] >= r["  LM calls inside ours"] > 0 and r["grammar"] > 0
    assert 0 < r["rest (sampler, resampling, product)"] < r["total"]


def test_w1_split_accounts_for_a_real_scoring_run_and_unwraps():
    """``gpu_profile._split`` on the tiny paged model (CPU): a real W1 scoring run whose
    nested pieces lie within their callers' time, with the run's LM calls, forward passes
    and contexts counted; every wrapped function is the original again afterwards."""
    from benchmarks.gpu_profile import _split
    from genlm_bytes_potential import lm_state
    from genlm_bytes_potential.beam import draft, extend, prefetch
    from genlm_bytes_potential.byte_lm import ByteLM

    lm, info = make_lm("tiny", backend="paged")
    paged = lm.inner
    blm = ByteLM(paged, K=4, eos_tokens=info["eos"])
    wrapped = [
        (lm_state.TokenModel, "_compute"),
        (lm_state.TokenModel, "extend"),
        (lm_state, "event_done"),
        (extend, "_read_and_prune"),
        (extend, "_prefetch"),
        (prefetch, "drafted_contexts"),
        (draft, "draft"),
    ]
    before = [getattr(owner, name) for owner, name in wrapped]
    calls, forwards = blm.model.stats.batch_calls, paged.forward_calls
    r = {name.strip(): value for name, value in _split(blm, paged, heldout_text(60)).items()}
    assert [getattr(owner, name) for owner, name in wrapped] == before
    assert "_evaluate" not in vars(paged) and "masses" not in vars(blm.model.trie)
    assert r["LM calls (count)"] == blm.model.stats.batch_calls - calls >= 1
    assert r["forward passes (count)"] == paged.forward_calls - forwards >= 1
    assert r["contexts asked for (count)"] >= r["LM calls (count)"]
    lm_call = r["TokenModel._compute (LM call, trie batch into the store)"]
    assert 0 < r["evaluate (plan and queue the forward, gather rows)"] <= r["LM call (await)"] <= lm_call
    assert 0 < r["draft (stand-ins, gather, kernels, extensions)"] <= r["drafted contexts"] <= r["step: prefetch"]
    assert r["step: read and prune"] > 0 and r["step: assemble"] > 0
    assert lm_call + r["step: read and prune"] + r["step: assemble"] < r["total"]
