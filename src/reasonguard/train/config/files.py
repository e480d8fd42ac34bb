"""Config files: a YAML mapping read, `key=value` overrides applied, a config dataclass built
from them, and an error blamed on whoever caused it (the file, or the override). Also writing a
config back as YAML that loads again.

The functions take the config dataclass as `cls` (`SFTConfig` by default); the classifier and the
HS-DPO pipeline read their own configs with them too.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from reasonguard.errors import UserError
from reasonguard.train.config.schema import SFTConfig, field_names


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    cls: type = SFTConfig,
    overrides_from: str = "command-line override",
) -> Any:
    """Read a YAML config, apply `key=value` overrides and validate everything.

    Args:
        path: the YAML file; None starts from the defaults.
        overrides: `key=value` strings; values are parsed as YAML scalars (`lr=5e-5` is a float,
            `splits=[a,b]` a list, `max_length=null` None); dotted keys address nested mappings.
        cls: the config dataclass (SFT by default; DPO brings its own).
        overrides_from: what an error caused by an override calls it (see
            `config_with_overrides`).

    Returns:
        A validated `cls` instance.

    Raises:
        UserError: unreadable file or YAML, unknown key (with a close match and the allowed keys),
            wrong type, or a value outside the allowed set; named after the file, or after the
            override that causes it.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    source = str(path) if path is not None else "config"
    return config_with_overrides(data, overrides, cls, source, overrides_from)


def config_with_overrides(
    data: Mapping[str, Any],
    overrides: Sequence[str],
    cls: type = SFTConfig,
    source: str = "config",
    overrides_from: str = "command-line override",
) -> Any:
    """Build a validated config from a mapping plus `key=value` overrides, and blame an error on
    whoever caused it: the file (`source`), or the override.

    When the mapping is valid on its own, the overrides are applied one at a time and the first
    one that makes the config invalid is named (`command-line override learning_rate=fast: config
    key 'learning_rate': expected a number, got 'fast'`). When the mapping is invalid on its own,
    the error is the file's, unless the key it names was set by an override.

    Raises:
        UserError: see `load_config`.
    """
    combined = apply_overrides(data, overrides)  # a malformed override fails here, by itself
    try:
        return config_from_dict(combined, cls, source)
    except UserError as exc:
        if not overrides:
            raise
        error = exc
    # The override that sets the key the error names is to blame. Only when none does are the
    # overrides replayed one at a time, since a prefix of them can be inconsistent on its own
    # (eval_split_ratio=0 before eval_strategy=no) where the whole list is not.
    key = _named_key(str(error).removeprefix(f"{source}: "))
    for item in reversed(overrides):
        if key is not None and _override_key(item) == key:
            raise _override_error(item, error, source, overrides_from) from None
    try:
        config_from_dict(data, cls, source)
    except UserError:
        raise error from None
    for i, item in enumerate(overrides):
        try:
            config_from_dict(apply_overrides(data, overrides[: i + 1]), cls, source)
        except UserError as exc:
            raise _override_error(item, exc, source, overrides_from) from None
    raise error


def _override_key(item: str) -> str:
    """The top-level config key an override sets (`lora.r=8` sets `lora`)."""
    return item.partition("=")[0].strip().split(".")[0]


def _named_key(message: str) -> str | None:
    """The config key an error message is about (`config key 'K': ...`), if it names one."""
    for prefix in ("config key '", "unknown config key '"):
        if message.startswith(prefix):
            return message[len(prefix) :].partition("'")[0]
    return None


def _override_error(item: str, error: UserError, source: str, overrides_from: str) -> UserError:
    """`<overrides_from> key=value: <what is wrong>`, the file's name left out."""
    message = str(error).removeprefix(f"{source}: ")
    return UserError(f"{overrides_from} {item.strip()}: {message}")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML mapping from a file (`yaml.safe_load`).

    Raises:
        UserError: unreadable file, invalid YAML, not a mapping, or a file that sets nothing
            (empty or only comments): that would silently train every default, which is the
            whole GuardReasonerTrain on the default model, not what anyone writes a file for.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from exc
    if data is None or data == {}:
        raise UserError(
            f"{path}: the config sets nothing (the file is empty or only comments); name at "
            "least model_name_or_path and dataset (the shipped configs/ are examples)"
        )
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with `key=value` overrides applied (the input is not modified).

    Raises:
        UserError: an override without `=` or with an empty key, or a value that is not YAML.
    """
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. learning_rate=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
        target = result
        parts = key.split(".")
        for part in parts[:-1]:
            nested = target.get(part)
            if not isinstance(nested, dict):
                nested = {}
                target[part] = nested
            target = nested
        target[parts[-1]] = value
    return result


def config_from_dict(data: Mapping[str, Any], cls: type = SFTConfig, source: str = "config") -> Any:
    """Build a validated config from a mapping (unknown keys rejected before anything else);
    errors are prefixed with `source`."""
    allowed = field_names(cls)
    for key in data:
        if key not in allowed:
            raise UserError(f"{source}: {_unknown_key_message(str(key), allowed)}")
    try:
        return cls(**data)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def save_config(config: Any, path: str | os.PathLike[str], header: str = "") -> Path:
    """Write a config as YAML (every field, in declaration order), loadable by `load_config`."""
    out = Path(path)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    out.write_text((header.rstrip("\n") + "\n" if header else "") + text, encoding="utf-8")
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _unknown_key_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key.replace(".", "_"), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
