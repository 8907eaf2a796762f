"""What benchmarks/search_precision.py reports of two arithmetics' fitness (hand-made figures)."""

import pytest

from benchmarks.search_precision import agreement, shift_by_depth


def test_agreement_of_two_rankings():
    fp32 = [0.50, 0.40, 0.30, 0.20, 0.10, 0.60, 0.70, 0.80, 0.90, 0.95, 0.99]
    bf16 = [0.50, 0.40, 0.30, 0.20, 0.12, 0.60, 0.70, 0.80, 0.90, 0.95, 0.985]
    figures = agreement("error", fp32, bf16)
    assert figures["max_abs_error_diff"] == pytest.approx(0.02)
    assert figures["mean_abs_error_diff"] == pytest.approx(0.025 / 11, abs=1e-4)
    assert figures["error_range_fp32"] == [0.1, 0.99]
    assert figures["spearman_error"] == 1.0
    assert figures["same_best_error"] is True
    assert figures["best_10pct_overlap_error"] == 1.0  # the best one of 11


def test_a_swapped_best_is_seen():
    figures = agreement("loss", [1.0, 2.0, 3.0], [2.0, 1.0, 3.0])
    assert figures["same_best_loss"] is False
    assert figures["best_10pct_overlap_loss"] == 0.0
    assert figures["spearman_loss"] == pytest.approx(0.5)


def test_the_shift_is_averaged_per_depth_and_never_negative_zero():
    shifts = shift_by_depth([0.5, 0.5, 0.4, 0.3], [0.5, 0.5, 0.45, 0.4], [1, 1, 3, 3])
    assert shifts == {"1": 0.0, "3": pytest.approx(0.075)}
    assert str(shifts["1"]) == "0.0"
    assert str(shift_by_depth([0.5], [0.49999999], [2])["2"]) == "0.0"  # rounds to -0.0 otherwise
