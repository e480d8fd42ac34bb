"""`reasonguard generate`: resumable generation over benchmarks or training data.

- `run.py`: `run_jobs`, the entry point (one process, or data-parallel workers);
- `jobs.py`: what to generate (one output file per job), the decoding settings, the rows and the
  timing file beside each output;
- `windows.py`: one job's rows on a loaded backend, window by window, in input order;
- `parallel.py`: data-parallel worker processes and the ordered merge of their outputs;
- `resume.py`: durable appends, the run folder's manifest and its lock.
"""
