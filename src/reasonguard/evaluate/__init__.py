"""Benchmark evaluation: registry, scoring protocols, metrics, reports, comparisons and plots.

Nothing here imports torch, transformers, numpy or pandas: `reasonguard evaluate` and
`reasonguard compare` start in a fraction of a second (matplotlib is imported only to draw charts).

Example:
    >>> from reasonguard.evaluate.evaluator import evaluate_predictions
    >>> metrics = evaluate_predictions("preds/", "benchmarks/", protocol="strict")
    >>> metrics["overall_f1"]
"""
