"""The backend interface every generator implements (`loading.load_backend` picks one).

A backend owns a model and its tokenizer and knows the prompt format the model was trained
with, so callers hand it rendered inputs (`build_prompt`) and get text back (`generate`).
Two implementations: `hf.HFBackend` (transformers, CPU or GPU) and `vllm.VLLMBackend` (GPU, or
an x86 CPU with vLLM's CPU build); both have fast mode and answer scores.

Example:
    >>> from reasonguard.infer.loading import load_backend
    >>> backend = load_backend("smollm2", "hf", prompt_format="raw")
    >>> prompt = backend.build_prompt(render_input("How do I bake bread?"))
    >>> [[g]] = backend.generate([prompt], max_new_tokens=64)
    >>> g.text, g.num_tokens, g.hit_token_limit
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reasonguard.errors import UserError
from reasonguard.folders import checkpoint_run_config
from reasonguard.format import (
    INSTRUCTION,
    build_prompt,
    check_prompt_format,
    fast_mode_instruction,
)
from reasonguard.infer.fast_stream import RecomputingStream
from reasonguard.models import read_guard_config

BACKENDS = ("hf", "vllm")
DEFAULT_PROMPT_FORMAT = "raw"  # what the official GuardReasoner inference code uses

# Called after each internal batch with the positions (in the `prompts` list) it finished and
# their generations, so callers can write results and advance progress bars as they come.
BatchCallback = Callable[[list[int], list[list["Generation"]]], None]


@dataclass(frozen=True)
class Generation:
    """One generated continuation.

    Attributes:
        text: the decoded text, without the end-of-turn token or padding.
        num_tokens: generated tokens, not counting the end-of-turn token.
        hit_token_limit: generation stopped at `max_new_tokens`, not at an end-of-turn token.
        timed_out: generation stopped at the caller's deadline (the text may be cut short).
    """

    text: str
    num_tokens: int
    hit_token_limit: bool
    timed_out: bool = False

    @property
    def truncated(self) -> bool:
        """Cut short by the token limit or the deadline: the answer may be missing."""
        return self.hit_token_limit or self.timed_out


class Backend:
    """Base class: prompt building and encoding shared by all backends.

    Attributes:
        name: the model as given (alias, hub id or folder).
        path: the resolved model folder or hub id.
        prompt_format: the format prompts are built in (see `reasonguard.format.PROMPT_FORMATS`).
        tokenizer: the model's Hugging Face tokenizer.
        batch_size: prompts per forward batch (a backend may treat it as a hint).
        fast_mode_marker: the mode marker the model was trained with for answer-only rows
            (dual-mode training), or None; fast-mode prompts carry it.
    """

    fast_mode_marker: str | None = None
    supports_fast = False  # implements `fast_verdicts`
    # The `Guard.classify` modes it answers, its default first (a classifier: `classifier`).
    modes: tuple[str, ...] = ("reasoning", "fast", "cascade")
    name: str
    path: str
    prompt_format: str
    tokenizer: Any
    batch_size: int

    def window_size(self) -> int:
        """Prompts per `generate` call in resumable generation: several batches, so sorting by
        length has something to sort, few enough that a restart redoes little. Known before
        loading through `planned_window_size`."""
        return self.batch_size * 4

    def build_prompt(self, input_text: str, instruction: str | None = None) -> str:
        """The text the model sees for a rendered input, in this model's prompt format."""
        try:
            return build_prompt(
                input_text, self.prompt_format, self.tokenizer, instruction or INSTRUCTION
            )
        except ValueError as exc:
            raise UserError(f"{self.name}: {exc}") from None

    def build_fast_prompt(self, input_text: str, instruction: str | None = None) -> str:
        """The prompt of fast mode: the model's own, with the fast-mode marker in the
        instruction when the model was trained with one."""
        instruction = instruction or INSTRUCTION
        if self.fast_mode_marker:
            instruction = fast_mode_instruction(instruction, self.fast_mode_marker)
        return self.build_prompt(input_text, instruction)

    def fast_verdicts(self, prompts: Sequence[str], tasks: Sequence[Sequence[str]]) -> list[Any]:
        """Fast-mode verdicts (`fast.FastVerdict`) of fast-mode prompts, for the tasks asked.

        Raises:
            UserError: the backend has no fast mode.
        """
        raise UserError(f"{self.name}: {type(self).__name__} has no fast mode")

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, tokenized exactly as training did (`data/tokenize.py`):
        with the tokenizer's special tokens for `raw`, without for the chat formats, whose
        template already writes them."""
        if not prompts:
            return []
        add_special = self.prompt_format == "raw"
        return [
            list(ids)
            for ids in self.tokenizer(list(prompts), add_special_tokens=add_special)["input_ids"]
        ]

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 2048,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        on_batch: BatchCallback | None = None,
        deadline: float | None = None,
        with_scores: bool = False,
    ) -> list[list[Generation]]:
        """Generate `num_samples` continuations per prompt.

        Args:
            prompts: full prompt texts (see `build_prompt`).
            max_new_tokens: the most tokens generated per continuation.
            temperature: 0 (or less) for greedy decoding, else the sampling temperature.
            top_p: nucleus sampling mass (sampling only).
            num_samples: continuations per prompt; more than 1 needs temperature > 0.
            seed: the sampling seed; the same prompts, settings and seed give the same outputs.
            on_batch: called as each internal batch finishes (see `BatchCallback`).
            deadline: a `time.monotonic()` time after which generation stops; continuations not
                finished then are returned as they are, `timed_out` (HF only; vLLM ignores it).
            with_scores: `answer_scores` will be asked for these outputs; a backend that can read
                them from the generation itself keeps what it needs (vLLM: the label tokens'
                log-probs; the HF backend scores with a forward pass and ignores it).

        Returns:
            One list of `num_samples` generations per prompt, in prompt order.
        """
        raise NotImplementedError

    def answer_scores(
        self, prompts: Sequence[str], texts: Sequence[str], tasks: Sequence[Sequence[str]]
    ) -> list[dict[str, dict[str, float] | None]] | None:
        """Label probabilities at the answer positions of generated texts (see `scores.py`).

        Returns None when the backend cannot compute them.
        """
        return None

    def open_fast_stream(self) -> Any:
        """A stream of fast verdicts over one growing text (`fast_stream.py`). Here each check
        is a fresh fast verdict of the whole prompt, which is all a backend with a prefix cache
        (vLLM) needs; the HF backend keeps the item's KV cache instead.

        Raises:
            UserError: the backend has no fast mode.
        """
        if not self.supports_fast:
            raise UserError(
                f"{self.name}: streaming verdicts need fast mode, which {type(self).__name__} lacks"
            )
        return RecomputingStream(self)


def check_sampling(temperature: float, top_p: float, num_samples: int, max_new_tokens: int) -> None:
    """Reject generation settings that cannot work, with a message naming the option."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--samples must be at least 1, got {num_samples}")
    if num_samples > 1 and temperature <= 0:
        raise UserError(
            "--samples > 1 needs --temperature > 0 (greedy decoding repeats one output)"
        )
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def resolve_prompt_format(model_path: str | os.PathLike[str], given: str | None) -> str:
    """The prompt format to serve a model with.

    A model folder written by our training records its format (`reasonguard.json`); that wins,
    and a different `given` format is refused (a model prompted unlike its training answers
    badly). Hub ids and foreign folders use `given`, else `raw` (the official inference).

    Raises:
        UserError: `given` is unknown or contradicts the model's record.
    """
    if given is not None:
        try:
            check_prompt_format(given)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    record = read_guard_config(model_path) if Path(model_path).is_dir() else None
    if record is None:  # a checkpoint saved without the record: its run's config says
        record = checkpoint_run_config(model_path)
    recorded = (record or {}).get("prompt_format")
    if recorded is None:
        return given or DEFAULT_PROMPT_FORMAT
    if given is not None and given != recorded:
        raise UserError(
            f"{model_path} was trained with prompt format {recorded!r}; "
            f"--prompt-format {given!r} would prompt it differently (leave the option out)"
        )
    return recorded


def recorded_fast_marker(model_path: str | os.PathLike[str]) -> str | None:
    """The fast-mode marker a model folder was trained with (dual-mode R-SFT), or None."""
    record = read_guard_config(model_path) if Path(model_path).is_dir() else None
    return (record or {}).get("fast_mode_marker")
