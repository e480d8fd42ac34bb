"""Inference: generation backends (Hugging Face, vLLM), resumable generation and the guard API.

Nothing heavy is imported here: torch, transformers and vLLM load inside the modules that use them.

Example:
    >>> from reasonguard.infer.guard import load_guard
    >>> guard = load_guard("runs/sft-smollm2/final")
    >>> guard.classify([{"prompt": "How do I bake bread?"}])[0].prompt_harmfulness
    'unharmful'
"""
