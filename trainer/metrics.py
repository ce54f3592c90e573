"""Generation metrics: exact match (normalised), ANLS (DocVQA) and relaxed accuracy (ChartQA).

Each metric scores one prediction against one or more reference answers and returns a float in
[0, 1]; with several references the best one counts (as the DocVQA and ChartQA scorers do).
`score(name, prediction, answers)` picks a metric by name; `METRICS` lists the names.
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
    """Average Normalized Levenshtein Similarity for one question (DocVQA, Biten et al. 2019).

    Both strings are lower-cased with whitespace collapsed; the similarity to a reference is
    1 - dist / max(len); a normalised distance of `threshold` or more scores 0 (the DocVQA
    scorer's `< 0.5` test). The best reference counts.
    """
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in _as_list(answers):
        gold = " ".join(answer.strip().lower().split())
        longest = max(len(pred), len(gold))
        distance = levenshtein(pred, gold) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    """A number as ChartQA writes it: '12.5', '1,234', '45%' (= 0.45), '$3'. None otherwise."""
    text = text.strip().replace(",", "").lstrip("$").strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022): numbers may differ by `tolerance` relative to
    the reference (exactly equal when the reference is 0); anything else must match exactly
    after lower-casing and stripping. The best reference counts."""
    pred_text = prediction.strip().lower()
    pred_number = _to_float(pred_text)
    for answer in _as_list(answers):
        gold_text = answer.strip().lower()
        gold_number = _to_float(gold_text)
        if pred_number is not None and gold_number is not None:
            if gold_number == 0.0:
                if pred_number == 0.0:
                    return 1.0
            elif abs(pred_number - gold_number) / abs(gold_number) <= tolerance:
                return 1.0
        elif pred_text == gold_text:
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


def metric_for_dataset(name: str) -> str:
    """The customary metric for a dataset name: ANLS for DocVQA/InfographicVQA-like document
    sets, relaxed accuracy for ChartQA/PlotQA, exact match otherwise (synthetic demo, VQA)."""
    lowered = name.lower()
    if "chart" in lowered or "plotqa" in lowered:
        return "relaxed_accuracy"
    if any(key in lowered for key in ("docvqa", "infovqa", "infographic", "document", "doc")):
        return "anls"
    return "exact_match"
