"""Every example runs end to end (mock LM over GPT-2's real tokenizer, small settings)."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(monkeypatch, capsys, name, *argv):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_regex_smc(monkeypatch, capsys, model_dir):
    out = run_example(monkeypatch, capsys, "regex_smc.py", "--backend", "mock", "--model", model_dir,
                      "--pattern", "[0-9]{2}", "--particles", "3", "--max-bytes", "3")
    texts = re.findall(r"'(.*)'", out)
    assert texts and all(re.fullmatch(r"[0-9]{2}", t) for t in texts)


def test_json_schema(monkeypatch, capsys, model_dir):
    out = run_example(monkeypatch, capsys, "json_schema.py", "--backend", "mock", "--model", model_dir,
                      "--schema", '{"type": "boolean"}', "--particles", "4", "--max-bytes", "5")
    values = [json.loads(line.split(maxsplit=1)[1]) for line in out.splitlines()]
    assert values and all(isinstance(v, bool) for v in values)


def test_lark_arithmetic(monkeypatch, capsys, model_dir):
    out = run_example(monkeypatch, capsys, "lark_arithmetic.py", "--backend", "mock", "--model", model_dir,
                      "--particles", "3", "--max-bytes", "3")
    for line in out.splitlines():
        weight, expr, _, value = line.split()
        assert eval(expr) == int(value)


def test_ensemble(monkeypatch, capsys, model_dir):
    out = run_example(monkeypatch, capsys, "ensemble.py", "--backend", "mock", "--model-a", model_dir,
                      "--model-b", model_dir, "--pattern", "[a-c]{2}", "--particles", "2", "--max-bytes", "3")
    assert "tokenizer sizes: 50257 50257" in out
    assert all(re.fullmatch(r"[a-c]{2}", t) for t in re.findall(r"'(.*)'", out))


def test_score_file(monkeypatch, capsys, model_dir):
    out = run_example(monkeypatch, capsys, "score_file.py", str(EXAMPLES / "regex_smc.py"), "--backend", "mock",
                      "--model", model_dir, "--K", "1", "2", "--max-bytes", "40")
    assert len(re.findall(r"bits/byte", out)) == 2
