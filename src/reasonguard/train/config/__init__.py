"""The SFT config: one dataclass, YAML keys 1:1 with its fields, `key=value` overrides.

Field names follow Hugging Face `TrainingArguments` where one exists (`learning_rate`,
`per_device_train_batch_size`, `save_total_limit`, ...). Every check that does not need a model
runs here, when the config is loaded: an unknown or mistyped key, a wrong type or a value outside
a field's allowed set raises `UserError` naming the key, so a typo never costs a model load.

The package's parts: `schema` (the `SFTConfig` and `DPOConfig` keys and their rules), `files`
(reading YAML, applying overrides, blaming an error on its cause, writing a config back) and
`checks` (each field against its annotation). Their public names are all importable from here.

Example:
    >>> from reasonguard.train.config import load_config
    >>> config = load_config("configs/demo-cpu.yaml", ["learning_rate=1e-4", "lora_r=8"])
    >>> config.learning_rate, config.lora_r  # doctest: +SKIP
    (0.0001, 8)
"""

from reasonguard.train.config.checks import check_types
from reasonguard.train.config.files import (
    apply_overrides,
    config_from_dict,
    config_with_overrides,
    load_config,
    read_yaml,
    save_config,
)
from reasonguard.train.config.schema import (
    CHAT_TEMPLATES,
    DEFAULT_DATASET,
    LLAMA_TARGET_MODULES,
    DPOConfig,
    SFTConfig,
    field_names,
)

__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_DATASET",
    "LLAMA_TARGET_MODULES",
    "DPOConfig",
    "SFTConfig",
    "apply_overrides",
    "check_types",
    "config_from_dict",
    "config_with_overrides",
    "field_names",
    "load_config",
    "read_yaml",
    "save_config",
]
