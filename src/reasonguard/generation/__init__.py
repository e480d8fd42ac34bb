"""`reasonguard generate`: resumable generation over benchmarks or training data.

- `run.py`: `run_jobs`, the entry point (one process, or data-parallel workers);
- `jobs.py`: what to generate (one output file per job), the decoding settings, the rows and the
  timing file beside each output;
- `windows.py`: one job's rows on a loaded backend, window by window, in input order;
- `parallel.py`: data-parallel runs: the shard plan of each job and the ordered merge of the
  shards; `shards.py` (rows cut on window boundaries, the shard files), `placement.py` (each
  worker's device) and `workers.py` (the worker processes, both sides) are its parts;
- `resume.py`: durable appends, the run folder's manifest and its lock.
"""
