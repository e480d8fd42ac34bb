"""Inference: generation backends (Hugging Face, vLLM), fast and streaming verdicts, scores and
the guard API. Resumable `generate` runs are `reasonguard.generation`; the cascade's bands and
their calibration are `reasonguard.cascade`.

Nothing heavy is imported here: torch, transformers and vLLM load inside the modules that use them.

Example:
    >>> from reasonguard.infer.guard import load_guard
    >>> guard = load_guard("runs/sft-smollm2/final")
    >>> guard.classify([{"prompt": "How do I bake bread?"}])[0].prompt_harmfulness
    'unharmful'
"""
