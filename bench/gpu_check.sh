#!/usr/bin/env bash
# The GPU check: training (Experiment 19's QLoRA, packed, bf16 LoRA, QLoRA with Liger) and HF
# generation speed of a random-init Llama-3.2-3B, with peak memory and MFU (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh --prepare            # here: writes .gpu/ (wheels, data), prints the call
#   bash bench/gpu_check.sh --device             # there: installs .gpu/wheels, runs the check
#   bash bench/gpu_check.sh --device --dry-run   # the same on CPU, a tiny model
#   bash bench/gpu_check.sh [--dry-run]          # with the packages already installed
#   bash bench/gpu_check.sh --help               # every option of the check
#
# --device is for a machine with no network: it installs the carried wheels with
# `pip install --no-index --no-deps --target` into a temporary folder, puts that folder and src/
# on PYTHONPATH, and writes gpu_check.json, gpu_check.md and gpu_check.log to $OUT (default
# runs/gpu-check). Python: $PYTHON if set; else, for --prepare, the project's .venv (what
# `make setup` installs, whose package versions the check carries), and python3 on PATH otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" && "${1:-}" == "--prepare" && -x "$repo/.venv/bin/python" ]]; then
    python="$repo/.venv/bin/python"
fi
python="${python:-$(command -v python3 || command -v python || true)}"
if [[ -z "$python" ]]; then
    echo "error: no Python found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

case "${1:-}" in
--prepare)
    shift
    export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
    exec "$python" "$here/gpu_prepare.py" "$@"
    ;;
--device)
    shift
    out="${OUT:-$repo/runs/gpu-check}"
    mkdir -p "$out"
    log="$out/gpu_check.log"
    : >"$log"
    shopt -s nullglob
    wheels=("$repo"/.gpu/wheels/*.whl)
    if [[ ${#wheels[@]} -eq 0 ]]; then
        echo "error: $repo/.gpu/wheels holds no wheel: run 'bash bench/gpu_check.sh --prepare'" \
            "where a package index is reachable, and carry .gpu" | tee -a "$log" >&2
        exit 2
    fi
    site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")"
    trap 'rm -rf "$site"' EXIT
    echo "installing ${#wheels[@]} wheels into $site" | tee -a "$log"
    if ! "$python" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$site" "${wheels[@]}" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "error: pip could not install .gpu/wheels (log: $log)" >&2
        exit 2
    fi
    export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
    status=0
    "$python" "$here/gpu_check.py" --out "$out" --data "$repo/.gpu" --log "$log" "$@" || status=$?
    exit "$status"
    ;;
*)
    export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
    exec "$python" "$here/gpu_check.py" "$@"
    ;;
esac
