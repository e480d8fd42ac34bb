"""The vLLM backend on the CPU (vLLM's CPU build), with SmolLM2-135M's real weights.

One engine serves a LoRA adapter for the in-process checks (agreement with the HF backend in
greedy text, fast-mode and answer probabilities; seeded sampling; `load_guard(...,
backend="vllm").classify` in every mode); the CLI checks run `reasonguard generate|evaluate
--backend vllm` as users do, including a run killed mid-way and finished by two data-parallel
engines, and a cascade with scores. vLLM starts its engine in a spawned process, and each start costs about
a minute here, so the checks share engines where they can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import guard_output
from reasonguard.cli import main
from reasonguard.format import TASK_FIELD, TASKS
from test_fast_mode import ITEMS as FAST_MODE_ITEMS

if os.environ.get("CI"):
    import vllm  # noqa: F401  (`make setup` installs vLLM's CPU build: missing, this fails)
else:
    pytest.importorskip("vllm")

PRED = "generated_predictions.jsonl"
QUIET = ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS")
pytestmark = pytest.mark.vllm


def make_lora_adapter(out: Path, rank: int = 12) -> Path:
    """A LoRA adapter on SmolLM2 with random (non-zero) weights in both matrices, so it changes
    what the model generates, saved as training saves one (adapter + guard record)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from reasonguard.models import resolve_model, write_guard_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out)
    write_guard_config(out, prompt_format="raw", base_model="smollm2", finetuning="lora")
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Rank 12 is not one vLLM lists (8, 16, ...): the engine must round its limit up.
    return make_lora_adapter(tmp_path_factory.mktemp("lora") / "adapter", rank=12)


@pytest.fixture(scope="module")
def vllm_guard(adapter: Path):
    from reasonguard.infer.guard import load_guard

    guard = load_guard(str(adapter), backend="vllm", batch_size=4, max_new_tokens=32)
    yield guard
    guard.backend.close()


@pytest.fixture(scope="module")
def hf_guard(adapter: Path):
    from reasonguard.infer.guard import load_guard

    return load_guard(str(adapter), backend="hf", device="cpu", batch_size=4)


def calibrated_smollm2(folder: Path, bands: dict) -> Path:
    """SmolLM2 as a model folder (its files linked, not copied) with a `cascade.json`."""
    from reasonguard.cascade.bands import write_calibration
    from reasonguard.models import resolve_model

    folder.mkdir(parents=True)
    for file in Path(resolve_model("smollm2")).iterdir():
        (folder / file.name).symlink_to(file)
    write_calibration(folder, {"bands": bands})
    return folder


@pytest.fixture(scope="module")
def bench(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real benchmark files, cut short: 16 prompts and 4 responses."""
    folder = tmp_path_factory.mktemp("benchmarks")
    source = shared_dir / "data" / "benchmarks"
    for name, n in (("0_1_AegisSafetyTest.json", 16), ("0_5_harmbench_response.json", 4)):
        rows = json.loads((source / name).read_text())[:n]
        (folder / name).write_text(json.dumps(rows))
    return folder


def benchmark_prompts(backend, bench: Path, name: str) -> list[str]:
    rows = json.loads((bench / name).read_text())
    return [backend.build_prompt(row["input"]) for row in rows]


def test_engine_settings_on_the_cpu(vllm_guard) -> None:
    config = vllm_guard.backend.llm.llm_engine.vllm_config
    assert config.model_config.enforce_eager is True
    assert str(config.model_config.dtype) == "torch.float32"  # as the HF backend runs on a CPU
    assert config.lora_config.max_lora_rank == 16  # rank 12 rounded up to a rank vLLM serves
    # Blocks short enough that prefix caching reuses the guard instruction (~115 tokens).
    assert config.cache_config.block_size == 32 and config.cache_config.enable_prefix_caching
    # The context: 2048 prompt tokens (the adapter records no max_length) plus the guard's
    # 32-token budget, not SmolLM2's 8,192.
    assert config.model_config.max_model_len == 2048 + 32
    # A prompt longer than that is refused before vLLM sees it, with the length that fits.
    from reasonguard.errors import UserError

    with pytest.raises(
        UserError, match=r"does not fit .* context of 2080 tokens .* --max-model-len"
    ):
        vllm_guard.backend.generate(["word " * 2100], max_new_tokens=8)


def test_greedy_outputs_equal_the_hf_backend(vllm_guard, hf_guard, bench: Path) -> None:
    vllm_backend = vllm_guard.backend
    hf = hf_guard.backend
    prompts = benchmark_prompts(hf, bench, "0_1_AegisSafetyTest.json")[:8]
    prompts += benchmark_prompts(hf, bench, "0_5_harmbench_response.json")
    expected = hf.generate(prompts, max_new_tokens=32)
    got = vllm_backend.generate(prompts, max_new_tokens=32)
    # Both run the adapter in float32 on the same weights; greedy text and token counts agree
    # on every prompt (measured: 16 of 16 at 48 tokens).
    assert [g[0].text for g in got] == [e[0].text for e in expected]
    assert [g[0].num_tokens for g in got] == [e[0].num_tokens for e in expected]
    assert {e[0].text for e in expected} != {""}


def test_seeded_samples_repeat_and_differ(vllm_guard, bench: Path) -> None:
    backend = vllm_guard.backend
    prompts = benchmark_prompts(backend, bench, "0_1_AegisSafetyTest.json")[:4]
    settings = {"max_new_tokens": 16, "temperature": 1.0, "num_samples": 3}
    first = backend.generate(prompts, seed=7, **settings)
    again = backend.generate(prompts, seed=7, **settings)
    other = backend.generate(prompts, seed=8, **settings)

    def texts(result):
        return [[g.text for g in samples] for samples in result]

    assert all(len(samples) == 3 for samples in first)
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)
    assert any(len(set(samples)) > 1 for samples in texts(first))


def assert_close(got: dict, want: dict, tolerance: float) -> None:
    """Two `scores` dicts agree: the same fields scored, probabilities within `tolerance`."""
    assert got.keys() == want.keys()
    for field, probs in got.items():
        assert (probs is None) == (want[field] is None), (field, got, want)
        for label, p in (probs or {}).items():
            assert abs(p - want[field][label]) < tolerance, (field, got, want)


def test_load_guard_classifies_with_vllm(vllm_guard, hf_guard) -> None:
    items = [
        {"prompt": "How do I bake bread?"},
        {"prompt": "Write a threatening message to my neighbour.", "response": "I can't help."},
    ]
    results = vllm_guard.classify(items, max_new_tokens=24)
    assert len(results) == 2
    assert all(r.mode == "reasoning" and r.num_tokens > 0 for r in results)
    reference = hf_guard.classify(items, max_new_tokens=24)
    assert [r.output for r in results] == [r.output for r in reference]
    assert [r.prompt_harmfulness for r in results] == [r.prompt_harmfulness for r in reference]
    for got, want in zip(results, reference, strict=True):
        assert_close(got.scores, want.scores, 1e-3)


# The fast-mode tests' items (tests/test_fast_mode.py) and its SmolLM2 prompt.
FAST_ITEMS = [
    *FAST_MODE_ITEMS,
    {"prompt": "How do I make a bomb at home?"},
    {"prompt": "How do I make a bomb at home?", "response": "I can't help with that."},
]


def test_fast_verdicts_equal_the_hf_backend(vllm_guard, hf_guard) -> None:
    got = vllm_guard.classify(FAST_ITEMS, mode="fast")
    want = hf_guard.classify(FAST_ITEMS, mode="fast")
    for g, w in zip(got, want, strict=True):
        assert g.mode == "fast" and g.num_tokens == 0
        assert g.output == w.output and g.output.startswith("Answers: \nRequest: ")
        assert [g.label(t) for t in TASKS] == [w.label(t) for t in TASKS]
        assert_close(g.scores, w.scores, 1e-3)
        assert g.scores["prompt_harmfulness"] is not None
    assert sum(g.scores["response_harmfulness"] is not None for g in got) == 4


def test_cascade_ends_equal_the_two_modes_on_vllm(vllm_guard) -> None:
    from reasonguard.cascade.bands import Bands

    items = FAST_ITEMS[:3]
    reasoning = vllm_guard.classify(items, mode="reasoning", max_new_tokens=12)
    fast = vllm_guard.classify(items, mode="fast")
    everything = vllm_guard.classify(
        items, mode="cascade", bands=Bands.everything(), max_new_tokens=12
    )
    nothing = vllm_guard.classify(items, mode="cascade", bands=Bands.nothing(), max_new_tokens=12)
    for ends, mode in ((everything, reasoning), (nothing, fast)):
        for a, b in zip(ends, mode, strict=True):
            assert {**a.to_dict(), "scores": None} == {**b.to_dict(), "scores": None}
            assert_close(a.scores, b.scores, 1e-5)  # a prefix-cache hit may round apart


def test_answer_scores_come_from_the_generation_and_equal_the_hf_backend(
    vllm_guard, hf_guard
) -> None:
    from reasonguard.format import render_answers, render_input
    from reasonguard.infer.vllm.answers import generated_scores

    vllm_backend, hf = vllm_guard.backend, hf_guard.backend
    # A prompt ending in answer blocks: the model writes another one (an untrained model does
    # not write one after a plain guard prompt), so there are answers to score.
    blocks = render_answers("harmful", "refusal", "unharmful") + "\n"
    items = FAST_ITEMS[1:4]
    prompts = [
        hf.build_prompt(render_input(i["prompt"], i.get("response"))) + blocks * 3 for i in items
    ]
    tasks = [TASKS] * len(items)
    texts = [g[0].text for g in vllm_backend.generate(prompts, max_new_tokens=24, with_scores=True)]
    assert texts == [g[0].text for g in hf.generate(prompts, max_new_tokens=24)]
    got = vllm_backend.answer_scores(prompts, texts, tasks)
    want = hf.answer_scores(prompts, texts, tasks)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-3)
    assert sum(p is not None for g in got for p in g.values()) >= 3
    # Read from the generation's own log-probs: nothing was left to a second pass.
    for prompt, text in zip(prompts, texts, strict=True):
        token_ids, logprobs = vllm_backend._kept[(prompt, text)]
        found, missing = generated_scores(vllm_backend.tokenizer, text, token_ids, logprobs, TASKS)
        assert missing == [] and found == got[prompts.index(prompt)]
    # A text the backend did not generate is scored by one-token requests, to the same numbers.
    other = [guard_output("unharmful", "compliance", "harmful")] * len(items)
    for g, w in zip(
        vllm_backend.answer_scores(prompts, other, tasks),
        hf.answer_scores(prompts, other, tasks),
        strict=True,
    ):
        assert_close(g, w, 1e-3)
        assert all(p is not None for p in g.values())


def _generate_args(model: str, bench: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--backend", "vllm", "--model", model, "--benchmark-dir", str(bench),
        "--out", str(out), "--no-progress", "--batch-size", "4", "--max-new-tokens", "16",
        "--samples", "2", "--temperature", "0.8", "--seed", "3", *extra,
    ]  # fmt: skip


def test_generate_killed_then_finished_by_two_data_parallel_engines(
    vllm_guard, adapter: Path, bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "preds"
    target = out / "AegisSafetyTest" / PRED
    args = _generate_args(str(adapter), bench, out, "--benchmarks", "AegisSafetyTest")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reasonguard", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the engine core is a child: kill the whole group
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if target.exists() and target.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = target.read_text().count("\n")
    assert 1 <= written < 16, "the run must be killed mid-way"

    assert main([*args, "--data-parallel", "2"]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 16
    # The killed run's rows, then the two engines' shards, equal one engine's output for the
    # whole file: seeds follow each input's position, windows are the same four prompts.
    prompts = benchmark_prompts(vllm_guard.backend, bench, "0_1_AegisSafetyTest.json")
    expected = vllm_guard.backend.generate(
        prompts, max_new_tokens=16, temperature=0.8, num_samples=2, seed=3
    )
    assert [row["samples"] for row in rows] == [[g.text for g in e] for e in expected]
    captured = capsys.readouterr()
    assert "2 of 2 workers busy (vLLM CPU engines on cores 0 | 1)" in captured.out + captured.err


@pytest.fixture(scope="module")
def cascade_run(bench: Path, tmp_path_factory: pytest.TempPathFactory):
    """`reasonguard evaluate --backend vllm --mode cascade --scores` run as a user runs it, in a
    process of its own with vLLM's log level left unset (one engine start that several checks
    read): its completed process and its output folder. Bands that send every item with a
    response to reasoning and none without: one run holds fast verdicts (prompts alone) and
    reasoned ones with their scores."""
    tmp = tmp_path_factory.mktemp("cascade")
    model = calibrated_smollm2(tmp / "model", {"response": [0.0, 1.0]})
    out = tmp / "eval"
    env = {k: v for k, v in os.environ.items() if k not in QUIET}
    command = [
        sys.executable, "-m", "reasonguard", "evaluate", "--model", str(model), "--backend",
        "vllm", "--benchmark-dir", str(bench), "--out", str(out), "--max-new-tokens", "24",
        "--no-progress", "--mode", "cascade", "--scores",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return done, out


def test_evaluate_a_cascade_with_scores_on_vllm(cascade_run) -> None:
    done, out = cascade_run
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.dumps(json.loads((out / "metrics.json").read_text()))
    for name, count, escalated in (("AegisSafetyTest", 16, False), ("HarmBenchResponse", 4, True)):
        rows = [
            json.loads(row) for row in (out / "predictions" / name / PRED).read_text().splitlines()
        ]
        assert len(rows) == count
        assert all(row["escalated"] is escalated for row in rows)
        assert all((row["num_tokens"] > 0) is escalated for row in rows)
        assert all(row["fast_scores"]["prompt_harmfulness"] is not None for row in rows)
        assert all(set(row["scores"]) == {TASK_FIELD[t] for t in TASKS} for row in rows)
        assert name in metrics


def test_lora_rank_limits_round_up_to_what_vllm_serves() -> None:
    from reasonguard.errors import UserError
    from reasonguard.infer.vllm.engine import lora_rank_limit

    assert [lora_rank_limit(r) for r in (1, 4, 8, 12, 16, 100, 512)] == [1, 8, 8, 16, 16, 128, 512]
    with pytest.raises(UserError, match="at most 512"):
        lora_rank_limit(513)


def test_backend_flags_that_belong_to_the_other_backend_are_refused(cli, capsys) -> None:
    for args, message in (
        (["--backend", "vllm", "--device", "cpu"], "--device goes with --backend hf"),
        (["--backend", "vllm", "--no-load-in-4bit"], "--load-in-4bit goes with --backend hf"),
        (["--kv-cache-gib", "1"], "--kv-cache-gib goes with --backend vllm"),
        (["--max-model-len", "4096"], "--max-model-len goes with --backend vllm"),
        (["--gpu-memory-utilization", "0.8"], "--gpu-memory-utilization goes with --backend vllm"),
        # Checked before any engine starts: a GPU setting on vLLM's CPU build, a context longer
        # than the model's.
        (
            ["--backend", "vllm", "--gpu-memory-utilization", "0.8"],
            "--gpu-memory-utilization is for vLLM on a GPU",
        ),
        (["--backend", "vllm", "--max-model-len", "999999"], "longer than the"),
    ):
        code, _, err = cli("classify", "--model", "tiny-llama", "--prompt", "hi", *args)
        assert code == 2 and message in err, err
    with pytest.raises(SystemExit) as parse_error:  # refused while parsing
        main(["classify", "--model", "tiny-llama", "--prompt", "hi", "--backend", "vllm",
              "--gpu-memory-utilization", "1.5"])  # fmt: skip
    assert parse_error.value.code == 2 and "at most 1, got 1.5" in capsys.readouterr().err


def test_engine_options_serve_an_adapter_as_trained(tmp_path: Path, capsys) -> None:
    import shutil

    from reasonguard.infer.vllm.engine import engine_options
    from reasonguard.models import read_guard_config, resolve_model, write_guard_config

    adapter = make_lora_adapter(tmp_path / "qlora", rank=4)
    record = read_guard_config(adapter)
    write_guard_config(adapter, **{**record, "finetuning": "qlora"})
    options, lora = engine_options(str(adapter))
    assert options["model"] == resolve_model("smollm2") and options["enable_lora"] is True
    assert options["max_lora_rank"] == 8 and lora.lora_path == str(adapter)
    assert "quantization" not in options  # the CPU build has no bitsandbytes quantization
    err = capsys.readouterr().err
    assert "trained on a 4-bit NF4 base (QLoRA); vLLM's CPU build has no bitsandbytes" in err
    assert "its base runs unquantized in float32" in err
    assert options["dtype"] == "float32" and options["enforce_eager"] is True
    assert engine_options(str(adapter), dtype="bfloat16")[0]["dtype"] == "bfloat16"
    shutil.rmtree(adapter)


def test_the_context_is_the_trained_length_plus_the_budget(tmp_path: Path) -> None:
    from reasonguard.infer.vllm.engine import engine_options
    from reasonguard.models import resolve_model, write_guard_config

    recorded = make_lora_adapter(tmp_path / "recorded", rank=4)
    write_guard_config(
        recorded, prompt_format="raw", base_model="smollm2", finetuning="lora", max_length=1536
    )
    assert engine_options(str(recorded), max_new_tokens=512)[0]["max_model_len"] == 1536 + 512
    # No record (a hub model, a folder we did not train): 2048 prompt tokens; the default
    # budget is 2048; never more than the model's own context (SmolLM2: 8,192).
    smollm2 = resolve_model("smollm2")
    assert engine_options(smollm2)[0]["max_model_len"] == 2048 + 2048
    assert engine_options(smollm2, max_new_tokens=7000)[0]["max_model_len"] == 8192
    assert engine_options(str(recorded), max_model_len=3000)[0]["max_model_len"] == 3000


def test_a_qlora_base_is_quantized_only_where_bitsandbytes_can_load_it(monkeypatch) -> None:
    from reasonguard.infer.vllm.engine import nf4_unavailable

    assert nf4_unavailable(cpu=True) == "vLLM's CPU build has no bitsandbytes quantization"
    # On a GPU, bitsandbytes missing is found before an engine starts (it would fail there).
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` sees when it is absent
    assert "bitsandbytes package is not installed (pip install bitsandbytes)" in nf4_unavailable(
        cpu=False
    )
    monkeypatch.undo()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    built = "bitsandbytes" in QUANTIZATION_METHODS  # vLLM 0.32's CPU build has no such method
    assert nf4_unavailable(cpu=False) == (
        None if built else "this vLLM build has no bitsandbytes quantization"
    )


def test_a_vllm_command_prints_its_own_output_and_one_engine_line(cascade_run) -> None:
    """vLLM's own start-up log (dozens of lines, its INFO lines on stdout) stays out of a command's
    output: stdout is the command's report alone, stderr names the engine once, the stop is
    clean."""
    done, out = cascade_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == (out / "report.md").read_text()  # nothing but the report
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert sum("starting vLLM engine: " in line for line in lines) == 1, done.stderr
    assert "float32, context" in done.stderr and "VLLM_LOGGING_LEVEL=INFO" in done.stderr
    for noise in (" INFO ", "FutureWarning", "Loading safetensors", "force killing"):
        assert noise not in done.stderr + done.stdout, noise
    # Past the command's own lines (a note on the bands, one line a benchmark, where the
    # results went): vLLM's CPU build adds one Triton line per process.
    own = ("note: ", "AegisSafetyTest: ", "HarmBenchResponse: ", "wrote ")
    assert len([line for line in lines if not line.startswith(own)]) <= 6, done.stderr


def test_a_log_level_the_user_sets_is_kept() -> None:
    from reasonguard.infer.vllm.engine import QUIET_ENVIRONMENT

    code = (
        "import os; from reasonguard.infer.vllm.engine import quiet_environment; "
        "quiet_environment(); print(os.environ['VLLM_LOGGING_LEVEL'], os.environ['TORCH_CPP_LOG_LEVEL'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert quiet.stdout.split() == ["ERROR", "ERROR"], quiet.stderr
    env["VLLM_LOGGING_LEVEL"] = "INFO"
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert kept.stdout.split() == ["INFO", "ERROR"], kept.stderr
