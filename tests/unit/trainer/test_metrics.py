"""Generation metrics against hand-computed cases."""

from __future__ import annotations

import pytest

from trainer.metrics import (
    anls,
    exact_match,
    levenshtein,
    metric_for_dataset,
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
    # kitten -> sitting: distance 3, longest 7, 3/7 < 0.5 -> 1 - 3/7.
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls("abc", "abd") == pytest.approx(2 / 3)
    # Normalised distance exactly 0.5 is not below the threshold: scores 0.
    assert anls("ab", "ac") == 0.0
    assert anls("ab", "cd") == 0.0
    # Case and whitespace are ignored; the best of several references counts.
    assert anls("Hello   World ", "hello world") == 1.0
    assert anls("abcd", ["zzzz", "abce"]) == pytest.approx(3 / 4)
    assert anls("", "") == 1.0
    # A looser threshold lets a farther answer score.
    assert anls("ab", "ac", threshold=0.6) == pytest.approx(0.5)


def test_relaxed_accuracy_hand_computed() -> None:
    assert relaxed_accuracy("10.4", "10") == 1.0  # 4% off
    assert relaxed_accuracy("10.5", "10") == 1.0  # exactly 5% off
    assert relaxed_accuracy("10.6", "10") == 0.0  # 6% off
    assert relaxed_accuracy("9.5", "10") == 1.0
    assert relaxed_accuracy("45%", "0.45") == 1.0
    assert relaxed_accuracy("1,000", "1000") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.01", "0") == 0.0  # zero reference needs an exact zero
    assert relaxed_accuracy(" Yes", "yes") == 1.0
    assert relaxed_accuracy("no", "yes") == 0.0
    assert relaxed_accuracy("5", "five") == 0.0
    assert relaxed_accuracy("21", ["blue", "20.5"]) == 1.0


def test_score_dispatch_and_dataset_choice() -> None:
    assert score("anls", "abc", "abd") == pytest.approx(2 / 3)
    assert score("exact_match", "Red", "red") == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", "a")
    assert metric_for_dataset("ChartQA") == "relaxed_accuracy"
    assert metric_for_dataset("DocVQA-val") == "anls"
    assert metric_for_dataset("synth") == "exact_match"
