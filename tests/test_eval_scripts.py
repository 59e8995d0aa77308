"""The evaluation scripts' inputs: multiple-choice data checked line by line, and the command-line
arguments and texts the scripts refuse before loading a model."""

import json
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from trellis.eval.multiple_choice import Question, accuracy, read_questions

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"context": "2 + 2 =", "choices": ["4", "5"], "answer": 0}


def test_read_questions_takes_questions_of_any_number_of_choices(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", GOOD, "", {"context": "Red?", "choices": ["yes", "no", "maybe"], "answer": 2})
    questions = read_questions(data)
    assert questions == [Question("2 + 2 =", ["4", "5"], 0), Question("Red?", ["yes", "no", "maybe"], 2)]
    assert accuracy(questions, [-1.0, -2.0, -3.0, -2.0, -1.0]) == {"acc": 1.0, "acc_norm": 1.0}


def test_read_questions_takes_any_character_json_takes_and_names_a_file_that_is_not_utf8(tmp_path):
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string: they end no line."""
    data = tmp_path / "q.jsonl"
    context = "Line\u2028separator, paragraph\u2029and next\x85line:"
    data.write_text(json.dumps({**GOOD, "context": context}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_questions(data) == [Question(context, ["4", "5"], 0)]
    data.write_bytes(b"\xff" + data.read_bytes())
    with pytest.raises(ValueError, match=r"q.jsonl is not UTF-8 text \(invalid start byte at byte 0\)"):
        read_questions(data)


@pytest.mark.parametrize(("record", "message"), [
    ('{"context": "x"', "not valid JSON"),
    ('["x", ["a"], 0]', "a question must be a JSON object, got list"),
    ({"context": "x", "choices": ["a"]}, "missing field 'answer'"),
    ({**GOOD, "context": 3}, "'context' must be a string, got 3"),
    ({**GOOD, "choices": "234"}, "'choices' must be a non-empty list of strings, got '234'"),
    ({**GOOD, "choices": []}, "'choices' must be a non-empty list"),
    ({**GOOD, "choices": ["4", ""]}, r"'choices'\[1\] must be a non-empty string, got ''"),
    ({**GOOD, "choices": ["4", 5]}, r"'choices'\[1\] must be a non-empty string, got 5"),
    ({**GOOD, "answer": 1.9}, "'answer' must be the index of a choice .*, got 1.9"),
    ({**GOOD, "answer": True}, "'answer' must be the index of a choice .*, got True"),
    ({**GOOD, "answer": 2}, r"'answer' must be the index of a choice \(an integer from 0 to 1\), got 2"),
    ({**GOOD, "answer": -1}, "'answer' must be the index of a choice"),
])
def test_read_questions_names_the_line_and_field_of_bad_data(tmp_path, record, message):
    data = write_jsonl(tmp_path / "q.jsonl", GOOD, record)
    with pytest.raises(ValueError, match=f"q.jsonl:2: {message}"):
        read_questions(data)


def test_accuracy_refuses_mismatched_scores():
    with pytest.raises(ValueError, match="no questions to score"):
        accuracy([], [])
    with pytest.raises(ValueError, match="3 log-likelihoods for 2 choices"):
        accuracy([Question("x", ["a", "b"], 0)], [-1.0, -2.0, -3.0])


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_script(monkeypatch, capsys) -> Callable[..., Run]:
    """``python <script> <args>`` from the repository root, run in this process (a child would
    spend seconds importing torch and transformers for an argument error)."""
    monkeypatch.chdir(ROOT)

    def run(script: str, *args: str) -> Run:
        monkeypatch.setattr(sys, "argv", [script, *args])
        capsys.readouterr()
        try:
            runpy.run_path(script, run_name="__main__")
            returncode = 0
        except SystemExit as exit:
            returncode = exit.code if isinstance(exit.code, int) else 1
        out = capsys.readouterr()
        return Run(returncode, out.out, out.err)

    return run


@pytest.mark.parametrize(("args", "message"), [
    (["scripts/eval_multiple_choice.py", "--num-fewshot", "-1"], "argument --num-fewshot: must not be negative, got -1"),
    (["scripts/eval_multiple_choice.py", "--limit", "-2"], "argument --limit: must not be negative, got -2"),
    (["scripts/eval_multiple_choice.py", "--limit", "0"], "argument --limit: must be a positive integer, got 0"),
    (["scripts/eval_multiple_choice.py", "--max-batch-tokens", "0"], "argument --max-batch-tokens: must be a positive"),
    (["scripts/perplexity.py", "--max-length", "0"], "argument --max-length: must be a positive integer, got 0"),
    (["scripts/perplexity.py", "--max-length", "x"], "argument --max-length: not an integer: 'x'"),
    (["scripts/perplexity.py", "--block-size", "48"], "argument --block-size: block_size must be a power of two"),
    (["scripts/perplexity.py", "--text", "missing.txt"], "argument --text: no file 'missing.txt'"),
    (["scripts/eval_multiple_choice.py", "--data", "missing.jsonl"], "argument --data: no file 'missing.jsonl'"),
])
def test_scripts_refuse_bad_numbers_as_argparse_errors(run_script, args, message):
    done = run_script(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("text", ["", " \n\t\n"])
def test_perplexity_refuses_a_text_without_words(run_script, tmp_path, text):
    path = tmp_path / "blank.txt"
    path.write_text(text)
    done = run_script("scripts/perplexity.py", "--text", str(path))
    assert done.returncode == 2 and "has no words to score: it is empty or only whitespace" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_perplexity_counts_words_as_lm_eval(run_script, tmp_path):
    """lm-eval's count_words is ``len(re.split(r"\\s+", text))``: the trailing newline ends a third, empty word."""
    path = tmp_path / "two.txt"
    path.write_text("Hello  world\n")
    done = run_script("scripts/perplexity.py", "--text", str(path), "--max-length", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 words, 13 bytes" in done.stdout


def test_multiple_choice_script_takes_questions_of_different_sizes(run_script, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", GOOD, {"context": "Is the sky blue?", "choices": ["yes", "no", "green"],
                                                    "answer": 0})
    done = run_script("scripts/eval_multiple_choice.py", "--data", str(data))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 questions, 5 requests, 0-shot" in done.stdout and "for all its choices" in done.stdout


def test_multiple_choice_script_names_a_malformed_line_without_a_traceback(run_script, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"context": "x"\n')
    done = run_script("scripts/eval_multiple_choice.py", "--data", str(data))
    assert done.returncode == 2 and "q.jsonl:1: not valid JSON" in done.stderr and "Traceback" not in done.stderr
