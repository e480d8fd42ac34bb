"""Weighted DPO (the HS-DPO stage): `stage.py` runs it, `pairs.py` reads and checks the preference
pairs, `loss.py` is the weighted DPO + SFT loss, `logprobs.py` the chunked per-token log-probs at
the labelled positions that the loss is computed from.

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.dpo.stage import DPOConfig, run_dpo
    >>> run_dpo(load_config("configs/guardreasoner-hsdpo-1b.yaml", cls=DPOConfig))  # doctest: +SKIP
"""
