"""Training stages (R-SFT, HS-DPO) on transformers' `Trainer`, and the pieces they share.

- `sft.py`, `dpo.py`: the two stages (their data, their loss, their Trainer subclass);
- `recipe.py`: one run of any stage: run directory, resume, decisions, Trainer arguments,
  final model and `training_info.json`;
- `engine.py`: `GuardTrainer`, the Trainer fed one optimizer step of rows at a time (packing,
  token-normalised loss over the step, equal passes per rank, NaN guard, out-of-memory retry);
- `labelled_head.py`, `logprobs.py`, `packed_attention.py`: the LM head only at labelled
  positions, DPO's chunked log-probs, per-sample attention in packed rows on CPU;
- `callbacks.py`, `monitor.py`, `checkpoint.py`, `runinfo.py`: live status / metrics /
  TensorBoard, checkpoints and resume, the facts recorded in `training_info.json`;
- `config.py`, `data.py`, `dpo_data.py`, `modeling.py`, `decisions.py`, `launch.py`: configs,
  data, model loading, the run's `auto` decisions, multi-process launches;
- `plan.py` with `memory.py`, `timing.py`, `hardware.py`, `batch_profile.py`, `plan_report.py`:
  `reasonguard plan`'s time and memory estimates.

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.sft import run_sft
    >>> run_sft(load_config("configs/demo-cpu.yaml", ["max_steps=2"]))  # doctest: +SKIP
"""
