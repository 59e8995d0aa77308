"""Multiple-choice questions from a local JSONL file, scored as lm-eval's ``multiple_choice`` tasks.

Each line is ``{"context": str, "choices": [str, ...], "answer": int}``. A question becomes one
log-likelihood request per choice, ``(prefix + context, delimiter + choice)``; the prediction is
the choice with the highest log-likelihood (``acc``), or per character (``acc_norm``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trellis.utils import is_int, read_utf8

TARGET_DELIMITER = " "  # between a context and a choice, as lm-eval's default
FEWSHOT_DELIMITER = "\n\n"  # between solved examples, as lm-eval's default


@dataclass
class Question:
    context: str
    choices: list[str]
    answer: int


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file; a malformed line is a ValueError naming the line and field."""
    questions = []
    # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+2029 or U+0085, which a
    # JSON string may hold as they are.
    for number, line in enumerate(read_utf8(path).split("\n"), 1):
        if line.strip():
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from None
            questions.append(_question(record, where))
    return questions


def _question(record: object, where: str) -> Question:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a question must be a JSON object, got {type(record).__name__}")  # noqa: TRY004 -- bad data
    for name in ("context", "choices", "answer"):
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
    context, choices, answer = record["context"], record["choices"], record["answer"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string, got {context!r}")  # noqa: TRY004 -- bad data
    # A string would pass for a list of its characters.
    if not isinstance(choices, list) or not choices:
        raise ValueError(f"{where}: 'choices' must be a non-empty list of strings, got {choices!r}")
    for i, choice in enumerate(choices):
        # acc_norm divides by each choice's length.
        if not isinstance(choice, str) or not choice:
            raise ValueError(f"{where}: 'choices'[{i}] must be a non-empty string, got {choice!r}")
    if not is_int(answer) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be the index of a choice (an integer from 0 to "
                         f"{len(choices) - 1}), got {answer!r}")
    return Question(context, choices, int(answer))


def fewshot_prefix(examples: list[Question], delimiter: str = TARGET_DELIMITER) -> str:
    """Solved examples to put before every question: the few-shot prefix all documents share."""
    return "".join(q.context + delimiter + q.choices[q.answer] + FEWSHOT_DELIMITER for q in examples)


def choice_requests(questions: list[Question], prefix: str = "",
                    delimiter: str = TARGET_DELIMITER) -> list[tuple[str, str]]:
    """One ``(context, continuation)`` request per choice of each question, in order."""
    return [(prefix + q.context, delimiter + choice) for q in questions for choice in q.choices]


def accuracy(questions: list[Question], logprobs: list[float]) -> dict[str, float]:
    """``acc`` and ``acc_norm`` (log-likelihood per character of the choice) over ``questions``,
    given the log-likelihood of each request of ``choice_requests``, in order."""
    if not questions:
        raise ValueError("no questions to score")
    if len(logprobs) != sum(len(q.choices) for q in questions):
        raise ValueError(f"{len(logprobs)} log-likelihoods for {sum(len(q.choices) for q in questions)} choices")
    correct = correct_norm = 0
    start = 0
    for q in questions:
        scores = logprobs[start:start + len(q.choices)]
        start += len(q.choices)
        correct += max(range(len(scores)), key=scores.__getitem__) == q.answer
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / len(q.choices[i])) == q.answer
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions)}
