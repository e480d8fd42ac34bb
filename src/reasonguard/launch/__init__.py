"""Starting training processes and recording where they ran.

- `command.py`: the `accelerate launch` command behind `--num-processes N [--sharding S]`;
- `allocenv.py`: the glibc allocator settings a CPU run re-executes itself with;
- `runinfo.py`: git commit, package versions and hardware, recorded in `training_info.json`.
"""
