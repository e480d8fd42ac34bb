"""One training run of any stage, around `transformers.Trainer`: `setup() -> train() -> save() -> cleanup()`.

The stages (`train.sft`, `train.dpo.stage`) say how their data is prepared and which `GuardTrainer`
subclass trains it; this package owns what every run does the same way:

- **the run directory** (`rundir`): resume decisions (`resume: auto | never | checkpoint-N`), the
  resolved `config.yaml` written before the model loads, a finished run recognised (and not
  retrained), partial checkpoints dropped;
- **decisions**: every `auto` setting decided once from the data and the machine, printed and
  recorded (`plan.decisions`);
- **the Trainer's arguments** (`arguments`) from the config (Hugging Face names carried over 1:1),
  built before the weights load, so DeepSpeed ZeRO-3 loads them partitioned (`zero.Init`) and
  FSDP's `cpu_ram_efficient_loading` applies;
- **the record**: `final/` (the model or adapter, its tokenizer and `reasonguard.json`: `saving`),
  `training_info.json`, `loss_curve.png` and the last `status.json` (`record`), after success or
  failure.

`run` holds `Recipe`, which runs these steps, and `run_recipe`; `parts` the methods a stage
overrides. Only rank 0 writes files; every rank reads the checkpoint the run resumes from.

Example:
    >>> from reasonguard.train.recipe import INFO_FILE
    >>> INFO_FILE
    'training_info.json'
"""

from reasonguard.train.recipe.record import model_state_bytes
from reasonguard.train.recipe.run import Recipe, run_recipe
from reasonguard.train.recipe.rundir import (
    CONFIG_FILE,
    FINAL_DIR,
    INFO_FILE,
    TrainResult,
    run_finished,
)

__all__ = [
    "CONFIG_FILE",
    "FINAL_DIR",
    "INFO_FILE",
    "Recipe",
    "TrainResult",
    "model_state_bytes",
    "run_finished",
    "run_recipe",
]
