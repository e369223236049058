"""The command line as users run it: in-process on the mock backend (SmolLM2's or GPT-2's real
tokenizer, no weights) for the formats and errors; in a subprocess on the default model, with the
default backend and with vLLM, for what only a real run shows (engine logs kept off stdout)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genlm_bytes_potential import models
from genlm_bytes_potential.cli import ENGINE_LOG_ENV, late_schema_keywords, main

ROOT = Path(__file__).parent.parent
IMPOSSIBLE = b"ab\xff\xfe cd\n"  # SmolLM2 has no token containing 0xff or 0xfe


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_mock(capsys, model_dir, command, *argv):
    """``run`` of ``command`` on the mock backend over the tokenizer in ``model_dir``."""
    return run(capsys, command, "--backend", "mock", "--model", model_dir, *argv)


def run_cli(*argv, timeout=600):
    """``python -m genlm_bytes_potential ARGV`` in a fresh process, default model and backend."""
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_LOG_ENV}  # as in a user's shell
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "genlm_bytes_potential", *argv], capture_output=True, timeout=timeout, env=env, cwd=ROOT
    )


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- default backend
def test_sample_json_on_default_backend_parses(tmp_path):
    """stdout is the JSON document alone: no engine log line, no -Infinity."""
    proc = run_cli("sample", "--regex", "[0-9]{3}", "--particles", "4", "--max-bytes", "4", "--json")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads(proc.stdout)  # the whole of stdout
    assert result["samples"] and all(len(s["text"]) == 3 and s["text"].isdigit() for s in result["samples"])
    assert sum(s["weight"] for s in result["samples"]) == pytest.approx(1)
    d = result["diagnostics"]
    assert d["lm_calls"] >= 1 and d["lm_calls_per_byte"] > 0 and d["bytes_per_s"] > 0
    assert d["device"].startswith("cuda") if _gpu() else d["device"] == "cpu"  # the GPU when there is one
    assert all(s["pruned_mass"] >= 0 and s["heals"] == 0 for s in result["samples"])
    assert b"INFO" not in proc.stderr and b"Triton" not in proc.stderr  # engine logs are off unless --verbose


def test_score_impossible_byte_on_vllm_verbose(tmp_path):
    """--verbose sends vLLM's engine logs to stderr; stdout still parses, -inf is null."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    path = tmp_path / "bad.txt"
    path.write_bytes(IMPOSSIBLE)
    proc = run_cli("score", str(path), "--json", "--verbose", "--backend", "vllm")
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads(proc.stdout)
    assert result["logprob"] is None and result["bits_per_byte"] is None
    assert result["impossible_byte"]["value"] == 0xFF and result["impossible_byte"]["position"] == 2
    assert "no token of the vocabulary contains it" in result["impossible_byte"]["reason"]
    assert b"INFO" in proc.stderr and b"INFO" not in proc.stdout


def test_help_imports_nothing_heavy():
    """--help and argument errors import neither torch nor genlm-control nor vLLM (their time
    is measured by benchmarks/cli_startup.py, not here)."""
    code = (
        "import sys\n"
        "from genlm_bytes_potential.__main__ import main\n"
        "for argv in (['--help'], ['sample', '--regex', 'a', '--particles', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'vllm', 'genlm.control', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert proc.stdout.decode().splitlines()[-1] == "[]", proc.stderr.decode()[-2000:]
    assert b"usage:" in proc.stdout and b"Triton" not in proc.stderr


# ----------------------------------------------------------------------------- mock backend
def test_sample_regex_json_output(capsys, model_dir, tmp_path):
    record = tmp_path / "run.json"
    code, out, err = run_mock(
        capsys,
        model_dir,
        "sample",
        "--regex",
        "[0-9]{3}",
        "--particles",
        "4",
        "--max-bytes",
        "4",
        "--json",
        "--record",
        str(record),
        "--no-progress",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] and all(len(s["text"]) == 3 and s["text"].isdigit() for s in result["samples"])
    assert sum(s["weight"] for s in result["samples"]) == pytest.approx(1)
    assert json.loads(record.read_text())  # the visualizer's record


def test_sample_no_particle_completes_json_has_no_infinity(capsys, model_dir):
    code, out, err = run_mock(
        capsys,
        model_dir,
        "sample",
        "--regex",
        "[0-9]{5}",
        "--particles",
        "2",
        "--max-bytes",
        "2",
        "--json",
        "--no-progress",
    )
    assert code == 0, err
    assert "Infinity" not in out and "NaN" not in out
    result = json.loads(out)
    assert result["samples"] == [] and result["log_ml"] is None


@pytest.mark.parametrize("extra", [["--exact"], ["--prune-threshold", "0.01"], ["--sampler", "awrs"]])
def test_sample_controls(capsys, model_dir, extra):
    code, out, err = run_mock(
        capsys,
        model_dir,
        "sample",
        "--regex",
        "[ab]{2}",
        "--particles",
        "3",
        "--max-bytes",
        "3",
        "--json",
        "--no-progress",
        *extra,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] and all(s["text"] in {"aa", "ab", "ba", "bb"} for s in result["samples"])
    assert result["K"] == (None if "--exact" in extra else 8)
    assert result["sampler"] == ("awrs" if "awrs" in extra else "direct")


def test_sample_canonical_on_hf(capsys, tiny_llama_dir):
    code, out, err = run(
        capsys,
        "sample",
        "--backend",
        "hf",
        "--model",
        str(tiny_llama_dir),
        "--regex",
        "[ab]{2}",
        "--particles",
        "2",
        "--max-bytes",
        "3",
        "--json",
        "--no-progress",
        "--canonical",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    )
    assert code == 0, err
    result = json.loads(out)
    assert all(s["text"] in {"aa", "ab", "ba", "bb"} for s in result["samples"])
    assert result["diagnostics"]["device"] == "cpu"


def test_sample_lark_text_output_with_progress(capsys, model_dir):
    code, out, err = run_mock(
        capsys,
        model_dir,
        "sample",
        "--lark",
        'start: "a" | "b" "c"',
        "--particles",
        "3",
        "--max-bytes",
        "3",
        "--prompt",
        "Say a: ",
    )
    assert code == 0, err
    assert out.startswith("ESS") and "SMC" in err and "B/s" in err
    lines = out.splitlines()
    texts = [json.loads(line.split()[-1]) for line in lines[1:] if not line.startswith("#")]
    assert texts and set(texts) <= {"a", "bc"}
    assert lines[-1].startswith("# ") and "LM calls" in lines[-1] and "pruned mass" in lines[-1]


def test_score(capsys, model_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("héllo wörld\n".encode())
    code, out, err = run(capsys, "score", "--backend", "mock", "--model", model_dir, str(f), "--json", "--K", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["bytes"] == 14 and result["bits_per_byte"] > 0 and result["impossible_byte"] is None
    assert result["diagnostics"]["lm_calls"] >= 1 and result["pruned_mass"] >= 0
    assert "score" in err and "B/s" in err  # the progress bar


def test_score_names_the_impossible_byte(capsys, smollm2_dir, tmp_path):
    """SmolLM2's vocabulary (here under the mock LM) has no token for 21 byte values."""
    f = tmp_path / "bad.txt"
    f.write_bytes(IMPOSSIBLE)
    code, out, err = run(capsys, "score", "--backend", "mock", "--model", str(smollm2_dir), str(f), "--no-progress")
    assert code == 0, err
    assert "byte 0xff at position 2 (after 'ab') has probability 0" in out
    assert "no token of the vocabulary contains it" in out


def test_score_several_files(capsys, smollm2_dir, tmp_path):
    """Several files are scored together: each gets what scoring it alone gives (the mock
    LM is exact), an impossible byte stops only its own file, and the total adds them."""
    paths = [tmp_path / "a.txt", tmp_path / "bad.txt", tmp_path / "c.txt"]
    for p, data in zip(paths, [b"Hello world\n", IMPOSSIBLE, b"def f(x): pass"]):
        p.write_bytes(data)
    mock = ("score", "--backend", "mock", "--model", str(smollm2_dir), "--no-progress", "--K", "3")
    code, out, err = run(capsys, *mock, *map(str, paths), "--json")
    assert code == 0, err
    result = json.loads(out)
    alone = []
    for p in paths:
        code, one, err = run(capsys, *mock, str(p), "--json")
        assert code == 0, err
        alone.append(json.loads(one))
    assert [f["file"] for f in result["files"]] == list(map(str, paths))
    for f, a in zip(result["files"], alone):
        assert (f["logprob"], f["bytes"], f["impossible_byte"]) == (a["logprob"], a["bytes"], a["impossible_byte"])
    assert result["files"][1]["impossible_byte"]["position"] == 2 and result["logprob"] is None
    assert result["bytes"] == sum(len(p.read_bytes()) for p in paths)
    code, out, err = run(capsys, *mock, str(paths[0]), str(paths[2]))
    lines = out.splitlines()
    assert lines[0].startswith(f"{paths[0]}: 12 bytes  log-prob ") and lines[1].startswith(f"{paths[2]}: 14 bytes")
    total = alone[0]["logprob"] + alone[2]["logprob"]
    assert lines[2] == f"total: 26 bytes  log-prob {total:.4f} nats  {-total / math.log(2) / 26:.4f} bits/byte"
    assert lines[3].startswith("# max pruned mass")


def test_next_byte_and_generate(capsys, model_dir):
    code, out, err = run(
        capsys, "next-byte", "--backend", "mock", "--model", model_dir, "--prompt", "Hello", "--top", "5", "--json"
    )
    assert code == 0, err
    top = json.loads(out)["top"]
    assert len(top) == 5 and sum(t["prob"] for t in top) <= 1 + 1e-9
    assert top == sorted(top, key=lambda t: -t["prob"])
    code, out, err = run_mock(
        capsys,
        model_dir,
        "generate",
        "--prompt",
        "Hi",
        "--max-bytes",
        "5",
        "--greedy",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["bytes"] == len(result["text"].encode()) <= 5 and result["diagnostics"]["lm_calls"] >= 1


def test_non_utf8_prompt(capsys, smollm2_dir, model_dir):
    bad = os.fsdecode(b"caf\xe9 ")  # what the shell passes for a Latin-1 argument
    code, _, err = run(
        capsys, "sample", "--backend", "mock", "--model", str(smollm2_dir), "--regex", "a", "--chat", "--prompt", bad
    )
    assert code == 2 and "--prompt (with --chat) is not valid UTF-8: byte 0xe9 at position 3" in err
    assert "Traceback" not in err
    # without --chat the prompt's bytes are read as they are
    code, out, err = run_mock(
        capsys,
        model_dir,
        "sample",
        "--regex",
        "a",
        "--prompt",
        bad,
        "--particles",
        "2",
        "--max-bytes",
        "2",
        "--json",
        "--no-progress",
    )
    assert code == 0, err and json.loads(out)["samples"]
    code, _, err = run(
        capsys, "generate", "--backend", "mock", "--model", str(smollm2_dir), "--prompt", os.fsdecode(IMPOSSIBLE)
    )
    assert code == 2 and "--prompt byte 0xff at position 2" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--regex", "[0-9"], "bad regex '[0-9': unterminated character set at position 0"),
        (["sample", "--regex", "a{3,1}"], "min repeat greater than max repeat"),
        (["sample", "--regex", "(?=a)b"], "genlm-control's byte-level regex (interegular) does not"),
        (["sample", "--lark", "start: ("], "bad Lark grammar: GrammarError: Unclosed parenthesis"),
        (["sample", "--json-schema", "{not json"], "bad JSON schema: not JSON"),
        (["sample", "--json-schema", '{"type": "strin"}'], "(at $.type of the schema)"),
        (["sample", "--regex", "a", "--exact", "--prune-threshold", "0.1"], "conflicts with --prune-threshold"),
        (["score", "/nonexistent/file.txt"], "does not exist"),
    ],
)
def test_user_errors_exit_2(capsys, model_dir, argv, message):
    code, out, err = run(capsys, *argv, "--backend", "mock", "--model", model_dir)
    assert code == 2 and message in err, err
    assert out == ""


def test_missing_model_exits_2(capsys):
    code, _, err = run(capsys, "score", "--backend", "mock", "--model", "/nonexistent/model", __file__)
    assert code == 2 and "cannot load model" in err


def test_paged_refusal_points_to_hf(capsys, tmp_path):
    """The paged backend runs Llama-family models only; its refusal tells the flag to use."""
    from tiny_models import gpt2_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, vocab_size=len(tok))).save_pretrained(
        tmp_path
    )
    tok.save_pretrained(tmp_path)
    code, _, err = run(capsys, "score", "--backend", "paged", "--model", str(tmp_path), __file__)
    assert code == 2 and "--backend hf" in err and "HFTokenLM" not in err


def test_schema_late_keyword_warning(capsys, model_dir):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 3},
            "maxItems": {"type": "array", "items": {"type": "integer"}},
        },
    }
    assert late_schema_keywords(schema) == ["maxLength at /properties/name"]  # a property named maxItems is not one
    code, _, err = run_mock(
        capsys,
        model_dir,
        "sample",
        "--json-schema",
        json.dumps(schema),
        "--particles",
        "1",
        "--max-bytes",
        "1",
        "--no-progress",
    )
    assert code == 0, err
    assert "warning: the JSON schema's maxLength at /properties/name is checked only once a value is complete" in err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--particles", "0"),
        ("--particles", "x"),
        ("--ess-threshold", "2"),
        ("--max-bytes", "-1"),
        ("--prune-threshold", "1"),
    ],
)
def test_bad_numbers_exit_2(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--regex", "a", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_default_model_cache_key_has_no_path(tmp_path, monkeypatch):
    """Two virtualenvs (two copies of the wheel's GGUF) share one converted folder."""
    a, b = tmp_path / "venv-a" / models._GGUF_FILE, tmp_path / "venv-b" / models._GGUF_FILE
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 5000)
    key = models._gguf_fingerprint(a)
    assert key == models._gguf_fingerprint(b) and str(tmp_path) not in json.dumps(key)
    b.write_bytes(b"GGUF" + bytes(range(256)) * 4999 + bytes(255) + b"\x01")  # same size, other content
    assert models._gguf_fingerprint(b) != key
