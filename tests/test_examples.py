"""Every example runs end to end on the default model (SmolLM2) and the default backend, as a
user runs it (a fresh process each), with a few bytes each."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
WEIGHT = r"([01]\.[0-9]{3})"  # each result line starts with its posterior weight


def run_example(name, *argv):
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "VLLM_LOGGING_LEVEL": "ERROR",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *argv], capture_output=True, timeout=600, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return proc.stdout.decode()


def results(out: str) -> list[str]:
    """The text after the weight on each result line."""
    found = [m.group(2) for m in re.finditer(rf"^{WEIGHT}  (.*)$", out, re.M)]
    assert found, out
    return found


def test_regex_smc():
    out = run_example("regex_smc.py", "--pattern", "[0-9]{2}", "--particles", "3", "--max-bytes", "3")
    assert all(re.fullmatch(r"'[0-9]{2}'", t) for t in results(out))


def test_json_schema():
    """Chat-template prompt (token ids) on the default model, then JSON from the schema."""
    out = run_example("json_schema.py", "--schema", '{"type": "boolean"}', "--particles", "4", "--max-bytes", "6")
    assert all(isinstance(json.loads(t), bool) for t in results(out))


def test_lark_arithmetic():
    out = run_example("lark_arithmetic.py", "--particles", "3", "--max-bytes", "3")
    for line in results(out):
        expr, _, value = line.split()
        assert eval(re.sub(r"\b0+(?=[0-9])", "", expr)) == int(value)  # (integers may have leading zeros)


def test_ensemble(smollm2_dir):
    """Two byte potentials (two engines of the default backend) multiplied."""
    out = run_example(
        "ensemble.py", "--model-b", str(smollm2_dir), "--pattern", "[a-c]{2}", "--particles", "2", "--max-bytes", "3"
    )
    assert "tokenizer sizes: 49152 49152" in out
    assert all(re.fullmatch(r"'[a-c]{2}'", t) for t in results(out))


@pytest.mark.parametrize("K", [["1", "4"]])
def test_score_file(K):
    out = run_example("score_file.py", str(EXAMPLES / "regex_smc.py"), "--K", *K, "--max-bytes", "24")
    scores = re.findall(r"K=(\d+)\s+24 bytes\s+([0-9.]+) bits/byte", out)
    assert [k for k, _ in scores] == K and all(0 < float(b) < 8 for _, b in scores)
