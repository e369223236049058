import json

import pytest

from genlm_bytes_potential.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_regex_json_output(capsys, model_dir, tmp_path):
    record = tmp_path / "run.json"
    code, out, err = run(capsys, "sample", "--backend", "mock", "--model", model_dir, "--regex", "[0-9]{3}",
                         "--particles", "4", "--max-bytes", "4", "--json", "--record", str(record), "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] and all(len(s["text"]) == 3 and s["text"].isdigit() for s in result["samples"])
    assert sum(s["weight"] for s in result["samples"]) == pytest.approx(1)
    assert json.loads(record.read_text())  # the visualizer's record


def test_sample_lark_text_output_with_progress(capsys, model_dir):
    code, out, err = run(capsys, "sample", "--backend", "mock", "--model", model_dir, "--lark", 'start: "a" | "b" "c"',
                         "--particles", "3", "--max-bytes", "3", "--prompt", "Say a: ")
    assert code == 0, err
    assert "ESS" in out and "SMC" in err
    texts = [json.loads(line.split()[-1]) for line in out.splitlines()[1:]]
    assert texts and set(texts) <= {"a", "bc"}


def test_score(capsys, model_dir, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("héllo wörld\n".encode())
    code, out, err = run(capsys, "score", "--backend", "mock", "--model", model_dir, str(f), "--json", "--K", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["bytes"] == 14 and result["bits_per_byte"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--regex", "[0-9"], "bad regex"),
        (["sample", "--lark", "start: ("], "bad Lark grammar"),
        (["sample", "--json-schema", "{not json"], "bad JSON schema"),
        (["score", "/nonexistent/file.txt"], "does not exist"),
    ],
)
def test_user_errors_exit_2(capsys, model_dir, argv, message):
    code, out, err = run(capsys, *argv, "--backend", "mock", "--model", model_dir)
    assert code == 2 and message in err


def test_missing_model_exits_2(capsys):
    code, _, err = run(capsys, "score", "--backend", "mock", "--model", "/nonexistent/model", __file__)
    assert code == 2 and "cannot load model" in err


@pytest.mark.parametrize("flag, value", [("--particles", "0"), ("--particles", "x"), ("--ess-threshold", "2"), ("--max-bytes", "-1")])
def test_bad_numbers_exit_2(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--regex", "a", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
