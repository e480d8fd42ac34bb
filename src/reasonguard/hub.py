"""Whether a model or dataset name can be had from here, before anything is downloaded.

A name that is neither an offline alias nor an existing path is either a typo or a Hugging Face
Hub id. `check_name` tells which and whether it can be loaded: a missing path, or a bare name
one typo away from an alias, fails at once ("no such folder"); a hub id fails within seconds when
the Hub is not reachable (one short TCP probe per process, `hub_available`), and under
`HF_HUB_OFFLINE=1` when it is not in the local Hugging Face cache (`in_hub_cache`); each message
says what works offline. Model names (`models.resolve_model`), data sources
(`data.sources`) and the dry run go through it.

Example:
    >>> from reasonguard.hub import check_name
    >>> check_name("smollm", aliases=("smollm2",))  # doctest: +SKIP
    UserError: no such folder: smollm (did you mean 'smollm2'?); ...
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from reasonguard.errors import UserError

# `owner/name` or a bare canonical name; a leading `.`, `/` or `~`, or more than one `/`, is a path.
HUB_ID_RE = re.compile(r"\A[A-Za-z0-9][\w.-]*(/[\w.-]+)?\Z")
_TRUE = ("1", "true", "yes", "on")
_HUB_PROBES: dict[str, bool] = {}

_OFFLINE_WORKS = {
    "model": (
        "Offline, these work: the aliases {aliases} (built from installed packages, no download), "
        "a local model folder (a training run's final/ folder or a downloaded model), and, with "
        "HF_HUB_OFFLINE=1 set, models already in the Hugging Face cache load without the network"
    ),
    "dataset": (
        "Offline, these work: the shipped sample set {aliases}, a local folder of split files "
        "(<split>.json, .jsonl or .parquet) or one such file, and, with HF_HUB_OFFLINE=1 set, "
        "datasets already in the Hugging Face cache load without the network"
    ),
}


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hugging Face Hub id (`owner/name` or a bare name)."""
    return bool(HUB_ID_RE.match(name)) and ".." not in name


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on (`HF_HUB_OFFLINE` set, or already in effect in
    the loaded hub client)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (False in offline mode).

    Here, below `models`, `data` and `plan`, so that every layer (planning, dry runs, loading)
    uses the one probe without importing the others.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection(
            (endpoint.hostname or "huggingface.co", port), timeout=timeout
        ).close()
    except OSError:
        return False
    return True


def hub_available() -> bool:
    """Whether the Hugging Face Hub can be used: False in offline mode (no probe), else the
    answer of one short TCP probe (`hub_reachable`), made once per process."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or ""
    if endpoint not in _HUB_PROBES:
        _HUB_PROBES[endpoint] = hub_reachable()
    return _HUB_PROBES[endpoint]


def _hf_cache_root() -> Path:
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser()


def in_hub_cache(repo_id: str, kind: str = "model") -> bool:
    """Whether a hub repo has a downloaded snapshot in the local Hugging Face cache (for a
    dataset, also the `datasets` library's prepared copy)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    hub_cache = Path(hub).expanduser() if hub else _hf_cache_root() / "hub"
    snapshots = hub_cache / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if kind == "dataset":
        prepared = os.environ.get("HF_DATASETS_CACHE")
        root = Path(prepared).expanduser() if prepared else _hf_cache_root() / "datasets"
        if not root.is_dir():
            return False
        # `datasets` names the folder `owner___snake_case_name` (GuardReasonerTrain ->
        # guard_reasoner_train).
        try:
            from datasets.naming import camelcase_to_snakecase
        except ImportError:  # without `datasets` there is no prepared copy to find
            return False
        *owner, dataset = repo_id.split("/")
        return (root / "___".join([*owner, camelcase_to_snakecase(dataset)])).is_dir()
    return False


def _close_alias(name: str, aliases: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name.lower(), list(aliases), n=1, cutoff=0.75)
    return close[0] if close else None


def check_name(
    name: str,
    kind: str = "model",
    *,
    aliases: Sequence[str],
    hub_id: bool | None = None,
) -> None:
    """Check that a name that is neither an alias nor an existing path can be had from here.

    Args:
        name: a model (`kind="model"`) or a data source (`kind="dataset"`) as the user wrote it.
        kind: `model` or `dataset` (the message and the hub cache differ).
        aliases: the offline aliases of that kind (`models.ALIASES` for a model), suggested
            for a close misspelling.
        hub_id: whether the name is a hub id; by default, whether it has the shape of one.

    Raises:
        UserError: a path that does not exist or a bare name close to an alias ("no such
            folder"); a hub id under `HF_HUB_OFFLINE` that is not in the local Hugging Face cache;
            a hub id when the hub is not reachable. Each message says what works offline.
    """
    if name in aliases or Path(name).expanduser().exists():
        return
    missing = "no such folder" if kind == "model" else "no such file or folder"
    is_hub_id = looks_like_hub_id(name) if hub_id is None else hub_id
    close = _close_alias(name, aliases) if "/" not in name else None
    if not is_hub_id or close:
        hint = f" (did you mean {close!r}?)" if close else ""
        what = (
            f"a model is an alias ({', '.join(aliases)}), a local model folder, or a Hugging Face "
            "Hub id (owner/name)"
            if kind == "model"
            else f"a data source is {', '.join(repr(a) for a in aliases)}, a local file or folder "
            "of split files, or a Hugging Face Hub dataset id (owner/name)"
        )
        raise UserError(f"{missing}: {name}{hint}; {what}")
    names = ", ".join(aliases if kind == "model" else [repr(a) for a in aliases])
    works = _OFFLINE_WORKS[kind].format(aliases=names)
    subject = f"model {name!r}" if kind == "model" else repr(name)
    local = "a local folder" if kind == "model" else "a local file or folder"
    if hub_offline():
        if in_hub_cache(name, kind):
            return
        raise UserError(
            f"cannot load {subject}: HF_HUB_OFFLINE is set (no Hugging Face Hub access), it is "
            f"not {local}, and it is not in the local Hugging Face cache. {works}"
        )
    if hub_available():
        return
    cached = (
        "It is in the local Hugging Face cache: set HF_HUB_OFFLINE=1 to load it from there. "
        if in_hub_cache(name, kind)
        else ""
    )
    raise UserError(
        f"cannot load {subject}: it is not {local}, and the Hugging Face Hub is not reachable "
        f"from this machine. {cached}{works}"
    )
