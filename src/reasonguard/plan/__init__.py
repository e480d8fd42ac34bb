"""What a training run will cost and decide, before any weights load.

- `estimate.py`: `reasonguard plan`: tokens, steps, memory and wall time of a config, on this
  machine or a named GPU; `target.py` the device and launch it is for, `fit.py` what would fit
  when the run does not;
- `dryrun.py`: `train ... --dry-run`: the data plan (rows, tokens, steps) without the weights;
- `decisions.py`: the `auto` settings a run resolves (checkpointing, QLoRA fallback, Liger,
  precision, attention), each with its reason;
- `memory.py`, `timing.py`, `batch_profile.py`, `hardware.py`: the memory and FLOP models, the
  token counts of the first steps, the GPU and model tables they use;
- `report.py`: the text `reasonguard plan` prints.

Nothing heavy is imported at module level: planning a 3B run must not load torch's CUDA stack.
"""
