"""tools/quality/stats.py against closed forms, table values and hand-computed cases."""

import math

import pytest

from tools.quality import stats


def test_t_cdf_matches_closed_forms_and_table_values():
    # df=1 is Cauchy: 1/2 + atan(t)/pi; df=2: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 10.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # printed t tables: t_{0.975, 4} = 2.776, t_{0.95, 4} = 2.132, t_{0.975, 30} = 2.042
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert stats.t_quantile(0.95, 4) == pytest.approx(2.131847, abs=1e-5)
    assert stats.t_quantile(0.975, 30) == pytest.approx(2.042272, abs=1e-5)
    assert stats.t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-5)


def test_tost_by_hand():
    # differences 0.2%, 0.4%, 0.0%, 0.2%, 0.2%: mean 0.2%, sd 0.1414%, se 0.06325%
    d = [0.002, 0.004, 0.0, 0.002, 0.002]
    result = stats.tost(d, margin=0.01)
    se = math.sqrt(0.000008 / 4) / math.sqrt(5)
    assert result["mean"] == pytest.approx(0.002)
    # upper test: t = (0.002 - 0.01) / se = -12.65 with 4 df; lower: t = 0.012 / se = 18.97
    assert result["p_upper"] == pytest.approx(stats.t_cdf(-0.008 / se, 4))
    assert result["p_upper"] < 1e-3 and result["equivalent"] is True
    low, high = result["interval"]  # the 90% interval: mean -+ 2.1318 se
    assert low == pytest.approx(0.002 - 2.131847 * se, rel=1e-5)
    assert high == pytest.approx(0.002 + 2.131847 * se, rel=1e-5)
    # a mean of 0.5% with a wide spread is not shown equivalent at +-1%, though its mean is inside
    wide = stats.tost([0.02, -0.01, 0.015, -0.005, 0.005], margin=0.01)
    assert -0.01 < wide["mean"] < 0.01 and wide["equivalent"] is False
    # outside the margin: not equivalent whatever the spread
    assert stats.tost([0.03, 0.031, 0.029], margin=0.01)["equivalent"] is False
    assert stats.tost([0.005] * 5)["equivalent"] is True and stats.tost([0.02] * 5)["equivalent"] is False
    assert stats.tost([0.001])["equivalent"] is None  # one seed: no verdict


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    d = [0.01, 0.03, -0.02, 0.04, 0.0]
    ci = stats.bootstrap_ci(d, seed=3)
    assert ci == stats.bootstrap_ci(d, seed=3)
    assert ci[0] < stats.mean(d) < ci[1]
    assert min(d) <= ci[0] and ci[1] <= max(d)  # means of resamples never leave the sample's range
    assert stats.bootstrap_ci([0.5] * 5) == (0.5, 0.5)
    # all differences of one sign: the interval excludes zero
    low, high = stats.bootstrap_ci([0.05, 0.07, 0.06, 0.08, 0.04], seed=1)
    assert low > 0


def test_paired_relative_compare_and_interpolate():
    assert stats.paired_relative([1.01, 2.0], [1.0, 2.5]) == pytest.approx([0.01, -0.2])
    with pytest.raises(ValueError):
        stats.paired_relative([1.0], [1.0, 2.0])
    result = stats.compare([1.0, 1.1, 0.9], [1.0, 1.0, 1.0])
    assert result["mean"] == pytest.approx(0.0)
    assert result["t_ci95"][0] == pytest.approx(-stats.t_quantile(0.975, 2) * 0.1 / math.sqrt(3))
    curve = [(0, 4.0), (10, 2.0), (20, 1.0)]
    assert stats.interpolate(curve, 5) == 3.0 and stats.interpolate(curve, 15) == 1.5
    assert stats.interpolate(curve, -1) == 4.0 and stats.interpolate(curve, 99) == 1.0
    assert stats.pareto_front([(1, 1), (2, 0.5), (2, 2), (0.5, 3)]) == [0, 1, 3]
