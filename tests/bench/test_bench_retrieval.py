"""bench/bench_retrieval.py's metrics against a hand-computed case."""
from phiforge.bench.bench_retrieval import metrics, recall_each


def test_recall_each_averages_to_metrics_recall():
    ranked = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    relevant = [{2}, {5, 99}, {0}]
    each = recall_each(ranked, relevant, k=10)
    assert each.tolist() == [1.0, 0.5, 0.0]
    assert float(each.mean()) == metrics(ranked, relevant)["recall@10"]
    assert recall_each(ranked, relevant, k=1).tolist() == [0.0, 0.0, 0.0]


def test_metrics_hand_computed():
    m = metrics([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [{2}, {5, 99}, {0}])
    assert m["recall@10"] == (1 + 0.5 + 0) / 3
    assert (m["hit@1"], m["hit@5"]) == (0.0, 2 / 3)
    assert abs(m["mrr@10"] - (0.5 + 0.5 + 0) / 3) < 1e-12
