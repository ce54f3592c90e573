"""Generation metrics: exact match (normalised), ANLS (DocVQA) and relaxed accuracy (ChartQA).

Each metric scores one prediction against one or more reference answers and returns a float in
[0, 1]; with several references the best one counts (as the DocVQA and ChartQA scorers do).
ANLS follows the official DocVQA / InfographicVQA scorer and relaxed accuracy pix2struct's
`relaxed_correctness` (google-research/pix2struct, pix2struct/metrics.py), so scores compare with
published numbers. `score(name, prediction, answers)` picks a metric by name; `METRICS` lists the names.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"。", "、", "，", "：", "；", "！", "？", "·"}


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match: NFKC, lower case, no punctuation or English articles,
    single spaces (the SQuAD/VQA convention, applied to any script)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(answer) for answer in _as_list(answers)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question, as the official DocVQA scorer.

    Both strings are lower-cased, stripped and their whitespace collapsed before the edit distance;
    the distance is divided by the longer of the two strings *as given* (the scorer measures
    `len(s.upper())` of the raw strings). The similarity 1 - NL of the closest reference counts,
    and a similarity below `threshold` scores 0 (so NL = 0.5 still scores 0.5).
    """
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in _as_list(answers):
        gold = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(gold, pred) / length if length else 0.0)
    similarity = 1.0 - min(distances) if distances else 0.0
    return similarity if similarity >= threshold else 0.0


def _to_float(text: str) -> float | None:
    """A number as pix2struct reads one: Python's `float`, with trailing `%` signs meaning / 100.
    Anything else (a comma, a currency sign, a trailing space after `%`) is not a number."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy, as pix2struct's `relaxed_correctness` (Masry et al. 2022).

    When the prediction and a non-zero reference both read as numbers, a relative error of at most
    `tolerance` is correct; otherwise the strings must be equal after lower-casing (no stripping,
    no comma removal: `"1,000"` is not `"1000"`, a zero reference needs the same string). The best
    reference counts.
    """
    pred_number = _to_float(prediction)
    for answer in _as_list(answers):
        gold_number = _to_float(answer)
        if pred_number is not None and gold_number:
            correct = abs(pred_number - gold_number) / abs(gold_number) <= tolerance
        else:
            correct = prediction.lower() == answer.lower()
        if correct:
            return 1.0
    return 0.0


METRICS: dict[str, Callable[[str, str | Sequence[str]], float]] = {
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
}


def score(metric: str, prediction: str, answers: str | Sequence[str]) -> float:
    """Score one prediction with the metric named `metric` (a key of `METRICS`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return METRICS[metric](prediction, answers)
