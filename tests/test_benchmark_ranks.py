"""The rank correlation the ranking benchmarks report (benchmarks/_validation.py).

Error rates on a slice tie often, so the ranks must share ties; with plain ordinal ranks the
tied cases below would come out as a perfect correlation.
"""

import math

import numpy as np
import pytest

from benchmarks._validation import average_ranks, spearman


def test_tied_values_share_the_mean_of_their_positions():
    assert average_ranks([3.0, 1.0, 1.0, 2.0]).tolist() == [3.0, 0.5, 0.5, 2.0]
    assert average_ranks([0.5, 0.5, 0.5]).tolist() == [1.0, 1.0, 1.0]


def test_ranks_without_ties_are_positions_in_sorted_order():
    assert average_ranks([0.3, 0.1, 0.2]).tolist() == [2.0, 0.0, 1.0]


def test_spearman_counts_ties_as_scipy_does():
    # By hand: ranks [0, 1.5, 1.5, 3, 4] against [0, 1, 2, 3, 4] give 9.5 / sqrt(9.5 * 10),
    # which is sqrt(0.95) = 0.97468 (scipy.stats.spearmanr's definition: Pearson's r of the
    # average ranks; scipy is not installed here, so it is not run).
    assert spearman([1, 2, 2, 3, 4], [10, 20, 30, 40, 50]) == pytest.approx(math.sqrt(0.95))


def test_spearman_is_one_for_monotone_and_minus_one_for_reversed_orders():
    values = np.array([0.2, 0.9, 0.4, 0.7])
    assert spearman(values, values**3) == pytest.approx(1.0)
    assert spearman(values, -values) == pytest.approx(-1.0)
