"""Training stages (R-SFT, HS-DPO) on transformers' `Trainer`, and the pieces they share.

- `sft.py` and the `dpo/` package: the two stages (their data, their loss, their Trainer
  subclass); `dpo/` holds the stage, its preference pairs, its weighted loss and the chunked
  log-probs it is computed from;
- `recipe/`: one run of any stage: run directory, resume, decisions, Trainer arguments,
  final model and `training_info.json`;
- `engine.py`: `GuardTrainer`, the Trainer fed one optimizer step of rows at a time (packing,
  token-normalised loss over the step, equal passes per rank, NaN guard, out-of-memory retry);
- `labelled_head.py`, `packed_attention.py`: the LM head only at labelled positions, per-sample
  attention in packed rows on CPU;
- `callbacks.py`, `monitor.py`, `checkpoint.py`: live status / metrics / TensorBoard, checkpoints
  and resume;
- `config/`, `data.py`, `modeling.py`: configs, data, model loading.

What a run will cost before it starts is `reasonguard.plan`; starting several processes is
`reasonguard.launch`.

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.sft import run_sft
    >>> run_sft(load_config("configs/demo-cpu.yaml", ["max_steps=2"]))  # doctest: +SKIP
"""
