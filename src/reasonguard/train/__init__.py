"""Training stages (R-SFT now, HS-DPO next) and the pieces they share.

- `config.py`: the SFT config dataclass, YAML loading and `key=value` overrides;
- `sft.py`: the reasoning-SFT recipe (`setup -> train -> save -> cleanup`);
- `data.py`: load, validate, split, encode and batch the SFT records;
- `modeling.py`: environment checks, model / optimizer / scheduler construction;
- `checkpoint.py`, `monitor.py`, `runinfo.py`: checkpoints and resume, live status / metrics /
  NaN guard / loss curve, and the facts recorded in `training_info.json` (shared with DPO).

Example:
    >>> from reasonguard.train.config import load_config
    >>> from reasonguard.train.sft import run_sft
    >>> run_sft(load_config("configs/demo-cpu.yaml", ["max_steps=2"]))  # doctest: +SKIP
"""
