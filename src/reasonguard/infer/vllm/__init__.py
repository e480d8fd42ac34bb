"""The vLLM backend: `backend.py` (offline `LLM` generation and fast verdicts), `answers.py`
(label probabilities from vLLM's log-probs) and `engine.py` (the engine's settings: dtype,
context, KV cache, LoRA, QLoRA). vLLM itself is imported only when an engine starts."""
