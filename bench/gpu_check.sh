#!/usr/bin/env bash
# The GPU check: training (QLoRA, bf16 LoRA, attention and Liger variants through
# `reasonguard train sft`) and vLLM generation speed of a random-init Llama-3.2-3B, with peak
# memory and MFU, in one JSON file and a table. Sized for under 8 minutes on one H100/H200 (a
# time budget cuts the rows' limits to fit); no network, no model weights.
#
#   bench/gpu_check.sh [--out runs/gpu-check]          # on a CUDA GPU machine
#   bench/gpu_check.sh --dry-run --out /tmp/gpu-check  # the same code path on CPU, tiny model
#   bench/gpu_check.sh --help                          # every option
#
# Python: $PYTHON if set, else this checkout's .venv, else python3 on PATH. The training rows and
# prompts come from $REASONGUARD_SHARED/data (default: the `shared` folder beside the checkout).
# The details are in bench/gpu_check.py.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then
        python="$repo/.venv/bin/python"
    else
        python="$(command -v python3 || command -v python || true)"
    fi
fi
if [[ -z "$python" ]]; then
    echo "error: no Python found (set PYTHON=/path/to/python)" >&2
    exit 2
fi
# reasonguard from this checkout, whether or not it is pip-installed.
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$here/gpu_check.py" "$@"
