"""core/stats.py pooled (several training runs) comparison: hand-computed values of the two-stage bootstrap."""
from __future__ import annotations

import numpy as np
import pytest

from npo_suite.core import stats


def test_two_stage_bootstrap_resamples_runs_hand_computed():
    # run 0 always scores 1, run 1 always 0: inside a run every row draw gives the run's value, so a
    # replicate is (#draws of run 0) / 2 -> 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 (Binomial(2, 1/2)).
    groups = np.stack([np.ones(50), np.zeros(50)])
    m = stats.grouped_bootstrap_means(groups, n_boot=8000, seed=1)
    assert set(np.unique(m)) == {0.0, 0.5, 1.0}
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert abs((m == value).mean() - p) < 0.02
    assert stats.grouped_bootstrap_ci(groups, n_boot=8000, seed=1) == (0.0, 1.0)
    # the row bootstrap over the pooled rows ignores the runs: a CI of about 0.5 +- 1.96 * 0.5 / 10
    lo, hi = stats.bootstrap_ci(groups.reshape(-1), n_boot=8000, seed=1)
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62


def test_two_stage_bootstrap_one_run_is_the_row_bootstrap_hand_computed():
    # one run, rows {0, 1}: a replicate is the mean of 2 row draws -> 0, 0.5, 1 with p 1/4, 1/2, 1/4
    m = stats.grouped_bootstrap_means([[0.0, 1.0]], n_boot=8000, seed=2)
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert abs((m == value).mean() - p) < 0.02


def test_pooled_compare_point_estimates_hand_computed():
    a = [[0.0, 1.0, 0.2], [1.0, 1.0, 0.5]]
    b = [[1.0, 1.0, 0.1], [0.0, 1.0, 0.9]]
    st = stats.pooled_compare(a, b, n_boot=500, seed=0)
    # win scores: [[1, .5, 0], [0, .5, 1]] -> 3/6; differences: [[1, 0, -.1], [-1, 0, .4]] -> 0.3/6
    assert st.n == 6 and st.ties == 2
    assert st.win_rate == pytest.approx(0.5) and st.mean_diff == pytest.approx(0.05)
    assert st.mean_a == pytest.approx(3.7 / 6) and st.mean_b == pytest.approx(4.0 / 6)
    assert st.ci_low <= st.win_rate <= st.ci_high and st.diff_ci_low <= st.mean_diff <= st.diff_ci_high


def test_pooled_compare_is_seeded_and_refuses_bad_input():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 40)), rng.normal(size=(3, 40)) + 0.3
    assert stats.pooled_compare(a, b, n_boot=300, seed=4) == stats.pooled_compare(a, b, n_boot=300, seed=4)
    with pytest.raises(ValueError, match="same shape"):
        stats.pooled_compare(a, b[:, :5])
    with pytest.raises(ValueError, match="same shape"):
        stats.pooled_compare(a[0], b[0])
    with pytest.raises(ValueError, match="NaN"):
        stats.pooled_compare(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-empty"):
        stats.grouped_bootstrap_means(np.zeros((0, 3)))
