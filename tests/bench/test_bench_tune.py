"""bench/bench_tune.py's statistics: the paired bootstrap interval and the MRR check, against hand-made cases."""
import numpy as np

from phiforge.bench.bench_tune import mrr_change, paired_interval


def test_interval_of_a_constant_shift_is_that_shift():
    before = np.linspace(0, 1, 50)
    assert paired_interval(before, before + 0.25, seed=0) == [0.25, 0.25]
    assert paired_interval(before, before, seed=0) == [0.0, 0.0]


def test_interval_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    before, after = rng.random(200), rng.random(200)
    ci = paired_interval(before, after, seed=3)
    assert ci == paired_interval(before, after, seed=3)
    assert ci != paired_interval(before, after, seed=4)
    assert ci[0] < float(np.mean(after - before)) < ci[1]
    assert 0.02 < ci[1] - ci[0] < 0.2  # sd of a mean of 200 differences of U(0,1): 0.029, so the 95% width ~0.11


def test_mrr_change_flags_only_a_fall_beyond_noise():
    before = np.ones(12)
    assert mrr_change(before, before * 0.5, seed=0)["fell_beyond_noise"]
    same = mrr_change(before, before, seed=0)
    assert not same["fell_beyond_noise"] and same["mrr_change_95ci"] == [0.0, 0.0]
