"""Generation metrics against hand-computed cases and against transcriptions of the reference scorers."""

from __future__ import annotations

import random
from typing import Optional

import pytest

from trainer.inference.scoring import (
    anls,
    exact_match,
    levenshtein,
    normalize_answer,
    relaxed_accuracy,
    score,
)


def test_normalize_answer() -> None:
    assert normalize_answer("  The Red  Circle. ") == "red circle"
    assert normalize_answer("ＡＢＣ!") == "abc"  # full-width letters fold under NFKC
    assert normalize_answer("빨간색입니다.") == "빨간색입니다"


def test_exact_match() -> None:
    assert exact_match("Red.", "red") == 1.0
    assert exact_match("a square", ["circle", "Square"]) == 1.0
    assert exact_match("squares", "square") == 0.0
    assert exact_match("", "square") == 0.0


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_anls_hand_computed() -> None:
    # kitten -> sitting: distance 3, longest 7, 3/7 -> 1 - 3/7.
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls("abc", "abd") == pytest.approx(2 / 3)
    # A normalised distance of exactly 0.5 leaves a similarity of 0.5, not below the threshold.
    assert anls("ab", "ac") == pytest.approx(0.5)
    assert anls("ab", "cd") == 0.0
    assert anls("abc", "xyc") == 0.0  # similarity 1/3 < 0.5
    # Case and whitespace are ignored; the best of several references counts.
    assert anls("Hello   World ", "hello world") == 1.0
    assert anls("abcd", ["zzzz", "abce"]) == pytest.approx(3 / 4)
    assert anls("", "") == 1.0
    # The length divides the raw strings: padding spaces dilute the distance.
    assert anls("ab   ", "ac") == pytest.approx(1 - 1 / 5)
    assert anls("ab", "ac", threshold=0.6) == 0.0


def test_relaxed_accuracy_hand_computed() -> None:
    assert relaxed_accuracy("10.4", "10") == 1.0  # 4% off
    assert relaxed_accuracy("10.5", "10") == 1.0  # exactly 5% off
    assert relaxed_accuracy("10.6", "10") == 0.0  # 6% off
    assert relaxed_accuracy("9.5", "10") == 1.0
    assert relaxed_accuracy("45%", "0.45") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.0", "0") == 0.0  # a zero reference is compared as a string
    assert relaxed_accuracy("no", "yes") == 0.0
    assert relaxed_accuracy("YES", "yes") == 1.0
    assert relaxed_accuracy("5", "five") == 0.0
    assert relaxed_accuracy("21", ["blue", "20.5"]) == 1.0
    # As pix2struct: no comma removal, no stripping, no currency signs.
    assert relaxed_accuracy("1,000", "1000") == 0.0
    assert relaxed_accuracy(" Yes", "yes") == 0.0
    assert relaxed_accuracy("$3", "3") == 0.0
    assert relaxed_accuracy(" 12 ", "12") == 1.0  # float() itself ignores surrounding spaces


def test_score_dispatch() -> None:
    assert score("anls", "abc", "abd") == pytest.approx(2 / 3)
    assert score("exact_match", "Red", "red") == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", "a")


# ------------------------------------------------------------------------------------------------
# Straight transcriptions of the reference scorers, and many generated answer pairs.


def reference_relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """google-research/pix2struct, pix2struct/metrics.py `relaxed_correctness`."""

    def _to_float(text: str) -> Optional[float]:  # noqa: UP045 (as written in the reference)
        try:
            if text.endswith("%"):
                return float(text.rstrip("%")) / 100.0
            else:
                return float(text)
        except ValueError:
            return None

    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        relative_change = abs(prediction_float - target_float) / abs(target_float)
        return relative_change <= max_relative_change
    else:
        return prediction.lower() == target.lower()


def reference_levenshtein_distance(s1: str, s2: str) -> int:
    """The DocVQA evaluation script's `levenshtein_distance`."""
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    distances = range(len(s1) + 1)
    for i2, c2 in enumerate(s2):
        distances_ = [i2 + 1]
        for i1, c1 in enumerate(s1):
            if c1 == c2:
                distances_.append(distances[i1])
            else:
                distances_.append(1 + min((distances[i1], distances[i1 + 1], distances_[-1])))
        distances = distances_
    return distances[-1]


def reference_anls(gt_answers: list[str], det: str, threshold: float = 0.5) -> float:
    """The official DocVQA / InfographicVQA scorer (rrc.cvc.uab.es), one question."""
    values = []
    for answer in gt_answers:
        gt_answer = " ".join(answer.strip().lower().split())
        det_answer = " ".join(det.strip().lower().split())
        dist = reference_levenshtein_distance(gt_answer, det_answer)
        length = max(len(answer.upper()), len(det.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    question_result = 1 - min(values)
    if question_result < threshold:
        question_result = 0
    return question_result


def _number(rng: random.Random) -> str:
    value = rng.choice([0, 0.0, 1, 7, 12.5, 45, 99.9, 1000, 1234567, 0.05, 3.14159])
    value = value * rng.choice([1, 1, -1, 1.03, 0.96, 1.06, 0.5])
    text = rng.choice(["{:g}", "{:.1f}", "{:.2f}", "{:,}", "{:,.1f}", "{}"]).format(value)
    return rng.choice(["", "", "+", " ", "$"]) + text + rng.choice(["", "", "%", " %", " ", "%%", "e2"])


def _word(rng: random.Random) -> str:
    word = rng.choice(["yes", "No", "Total Revenue", "Seoul", "합계", "1 won", "N/A", "", "  ", "straße"])
    if word and rng.random() < 0.4:  # a near miss: one character dropped, changed or added
        i = rng.randrange(len(word))
        word = rng.choice(
            [word[:i] + word[i + 1 :], word[:i] + "x" + word[i + 1 :], word[:i] + "e" + word[i:]]
        )
    return rng.choice([word, word.upper(), word.title(), f" {word}", f"{word}  ", word.replace(" ", "   ")])


def _answer_pairs(num: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(0)
    pairs = []
    for _ in range(num):
        make = _number if rng.random() < 0.5 else _word
        answers = [make(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        # Half the predictions derive from a reference (the interesting cases), half are independent.
        prediction = rng.choice(answers) if rng.random() < 0.5 else make(rng)
        if rng.random() < 0.5:
            prediction = rng.choice(
                [prediction.lower(), prediction.strip(), prediction.replace(",", ""), f" {prediction}"]
            )
        pairs.append((prediction, answers))
    return pairs


def test_scorers_equal_the_reference_scorers_on_generated_pairs() -> None:
    pairs = _answer_pairs(4000)
    relaxed = [relaxed_accuracy(p, answers) for p, answers in pairs]
    assert relaxed == [
        float(max(reference_relaxed_correctness(t, p) for t in answers)) for p, answers in pairs
    ]
    assert [anls(p, answers) for p, answers in pairs] == [reference_anls(answers, p) for p, answers in pairs]
    # The pairs reach both sides of every rule (else the comparison above proves little).
    assert 0.2 < sum(relaxed) / len(relaxed) < 0.8
    partial = [anls(p, a) for p, a in pairs if 0 < anls(p, a) < 1]
    assert len(partial) > 100
    assert (
        sum(relaxed_accuracy(p, a) != relaxed_accuracy(p.strip().replace(",", ""), a) for p, a in pairs) > 50
    )


def test_the_build_names_the_same_metrics() -> None:
    # data_tools (which never imports trainer) lists the names `build --metric` accepts.
    from data_tools.settings import METRIC_NAMES
    from trainer.inference.scoring import METRICS

    assert tuple(METRICS) == METRIC_NAMES
