"""Hard-sample DPO, GuardReasoner's stage 2 (the GuardReasoner paper, Liu et al. 2025, section 3.2).

- `mine`: hard-sample preference pairs from k sampled outputs per training prompt
  (`reasonguard mine`), with the per-row rules in `hard` and the counts in `summary`;
- `pipeline`: the whole stage as one resumable pipeline (`reasonguard hsdpo`), its config and
  plan of models and generation jobs in `config`;
- `stages`: runs each training and generation stage of the pipeline in a child process.

Example:
    >>> from reasonguard.hsdpo.mine import mine_files
    >>> mine_files(["generations/main/WildGuardTrainR.jsonl"], "pairs.jsonl")  # doctest: +SKIP
"""
