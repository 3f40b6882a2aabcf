"""phiforge.evaluation: RAG or fine-tuning, measured on the user's own questions (`phiforge evaluate`).

    from phiforge.evaluation import evaluate
    report = evaluate(model_dir, "qa.jsonl", index="index/", adapters={"ft": "ft-lora/"}, out="eval/")

metrics.py scores one answer, modes.py names the five modes, runner.py answers and scores them through the
serving engine, summary.py turns records into the table and the recommendation, report.py writes the files,
pipeline.py ties them together (`evaluate`).
"""
from .pipeline import evaluate

__all__ = ["evaluate"]
