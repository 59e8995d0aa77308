"""Multiple-choice questions from a local JSONL file, scored as lm-eval's ``multiple_choice`` tasks.

Each line is ``{"context": str, "choices": [str, ...], "answer": int}``. A question becomes one
log-likelihood request per choice, ``(prefix + context, delimiter + choice)``; the prediction is
the choice with the highest log-likelihood (``acc``), or per character (``acc_norm``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TARGET_DELIMITER = " "  # between a context and a choice, as lm-eval's default
FEWSHOT_DELIMITER = "\n\n"  # between solved examples, as lm-eval's default


@dataclass
class Question:
    context: str
    choices: list[str]
    answer: int


def read_questions(path: str | Path) -> list[Question]:
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            question = Question(record["context"], list(record["choices"]), int(record["answer"]))
            if not 0 <= question.answer < len(question.choices):
                raise ValueError(f"{path}:{number}: answer {question.answer} is not the index of a choice")
            questions.append(question)
    return questions


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
    correct = correct_norm = 0
    start = 0
    for q in questions:
        scores = logprobs[start:start + len(q.choices)]
        start += len(q.choices)
        correct += max(range(len(scores)), key=scores.__getitem__) == q.answer
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / len(q.choices[i])) == q.answer
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions)}
