"""A trained encoder classifier as a guard backend: one forward pass per item, no generation.

`load_guard(classifier_folder)` (and `load_backend`) give a `ClassifierBackend` for a folder
written by `reasonguard train classifier`. Its one mode is `classifier`: each item is encoded
exactly as training encoded it (`classifier.inputs.encode_texts`: the request alone, or the
request and response as a pair), the heads' sigmoids are the label probabilities, and the label
with the larger probability is the verdict. Results have the fields and `scores` of every other
mode, and an answer block (`format.render_answers`) as their `output`, so `generate` writes the
rows fast mode writes (`num_tokens` 0, `mode: classifier`) and `evaluate`, `compare` and the
charts read them unchanged.

It fills the backend interface through fast mode's method (`fast_verdicts`): the prompts it is
handed are the rendered guard inputs themselves (`build_prompt` adds no instruction: the
classifier has none), split back into request and response (`format.split_input`).
Streaming moderation (`stream.ResponseStream`) runs one encoder pass per check.
`check_model_mode` refuses, from the folder's record alone, any other mode for a classifier and
mode classifier for a generating guard, before weights load.

Example:
    >>> from reasonguard import load_guard
    >>> guard = load_guard("runs/classifier/final")
    >>> [r] = guard.classify([{"prompt": "How do I pick a lock?"}])
    >>> r.mode, r.scores["prompt_harmfulness"], r.num_tokens  # doctest: +SKIP
    ('classifier', {'harmful': 0.87, 'unharmful': 0.13}, 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reasonguard.errors import UserError
from reasonguard.format import (
    POSITIVE_LABEL,
    TASK_FIELD,
    TASK_LABELS,
    TASKS,
    render_answers,
    split_input,
)
from reasonguard.infer.backends import Backend, Generation
from reasonguard.infer.fast import FastVerdict
from reasonguard.infer.scores import empty_scores

CLASSIFIER_MODE = "classifier"
DEFAULT_BATCH_SIZE = 32


def check_model_mode(model: str, path: str, mode: str | None) -> None:
    """A classifier folder answers in mode classifier only, and only a classifier does; checked
    from the folder's record before any weights load. `mode` None: the model's default.

    Raises:
        UserError: the mode does not fit the model, naming both.
    """
    from reasonguard.classifier.kinds import is_classifier

    if mode is None:
        return
    if is_classifier(path) and mode != CLASSIFIER_MODE:
        raise UserError(
            f"{model} is an encoder classifier: its one mode is classifier (it writes no "
            f"reasoning and has no forced answer block), not mode {mode}"
        )
    if mode == CLASSIFIER_MODE and not is_classifier(path):
        raise UserError(
            "mode classifier needs a classifier folder from `reasonguard train classifier`; "
            f"{model} is a generating guard (its modes: reasoning, fast, cascade)"
        )


def check_classifier_tier(
    model: str, path: str, classifier: str, mode: str, bands: Any = None
) -> Any:
    """Check, before anything loads, a classifier put in front of the guard `model`
    (`load_guard(model, classifier=...)`, `--classifier`), and return the classifier tier's
    bands: `bands` if given, else the ones `reasonguard calibrate --classifier` saved in the
    model's `cascade.json` (None when the mode needs none).

    Raises:
        UserError: the classifier folder is not one, the guard is a classifier itself, or the
            three-tier cascade has no calibrated classifier bands.
    """
    from pathlib import Path

    from reasonguard.cascade.bands import CASCADE_FILE, read_bands
    from reasonguard.classifier.kinds import is_classifier

    if not Path(classifier).is_dir():
        raise UserError(f"--classifier {classifier}: no such folder")
    if not is_classifier(classifier):
        raise UserError(
            f"--classifier {classifier}: not a classifier folder (its reasonguard.json does not "
            "say kind encoder-classifier); give the final/ folder of `reasonguard train "
            "classifier`"
        )
    if is_classifier(path):
        raise UserError(
            f"{model} is an encoder classifier itself: --classifier goes in front of an LLM "
            "guard (--model a reasoning guard)"
        )
    if bands is not None or mode != "cascade":
        return bands
    found = read_bands(path, "classifier") if Path(path).is_dir() else None
    if found is None:
        raise UserError(
            f"{model}: no three-tier calibration in its {CASCADE_FILE} (no classifier bands); run "
            f"`reasonguard calibrate --model {model} --classifier {classifier} --data DEV` first"
        )
    return found


def _negative(task: str) -> str:
    return next(label for label in TASK_LABELS[task] if label != POSITIVE_LABEL[task])


def verdict_of(probabilities: dict[str, float], tasks: Sequence[str]) -> FastVerdict:
    """The verdict for P(positive label) per task, for the tasks asked (others stay None)."""
    labels: dict[str, str | None] = dict.fromkeys(TASKS)
    scores = empty_scores()
    for task in tasks:
        p = float(probabilities[task])
        positive, negative = POSITIVE_LABEL[task], _negative(task)
        labels[task] = positive if p >= 0.5 else negative
        scores[TASK_FIELD[task]] = {positive: p, negative: 1.0 - p}
    text = render_answers(labels["prompt"], labels["refusal"], labels["response"])
    return FastVerdict(labels=labels, scores=scores, text=text)


class ClassifierBackend(Backend):
    """A classifier folder loaded for inference (see the module docstring).

    Attributes:
        record: the folder's reasonguard.json (pooling, max length, what it was trained on).
        max_length: tokens read per item (as trained).
    """

    supports_fast = True
    modes = (CLASSIFIER_MODE,)

    def __init__(
        self,
        name: str,
        path: str,
        device: str | None = None,
        batch_size: int | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        from reasonguard.classifier.model import load_classifier

        if threads is not None:
            torch.set_num_threads(threads)
        self.name, self.path = name, path
        self.prompt_format = "raw"  # never used: the classifier reads the item, not a prompt
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model, self.tokenizer, self.record = load_classifier(path, device)
        self.max_length = int(self.record.get("max_length") or 512)

    def build_prompt(self, input_text: str, instruction: str | None = None) -> str:
        """The rendered input itself: the classifier has no instruction or prompt format."""
        return input_text

    def build_fast_prompt(self, input_text: str, instruction: str | None = None) -> str:
        return input_text

    def probabilities(self, pairs: Sequence[tuple[str, str | None]]) -> list[dict[str, float]]:
        """P(positive label) per task of each (request, response or None) pair."""
        import torch

        from reasonguard.classifier.inputs import collate, encode_texts

        rows = encode_texts(self.tokenizer, pairs, self.max_length)
        pad = self.tokenizer.pad_token_id or 0
        out: list[dict[str, float]] = []
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = collate(rows[start : start + self.batch_size], pad)
                inputs = {
                    k: v.to(self.device)
                    for k, v in batch.items()
                    if k in ("input_ids", "attention_mask", "token_type_ids")
                }
                probs = torch.sigmoid(self.model(**inputs).float()).cpu().tolist()
                out.extend(dict(zip(TASKS, p, strict=True)) for p in probs)
        return out

    def fast_verdicts(self, prompts: Sequence[str], tasks: Sequence[Sequence[str]]) -> list[Any]:
        """Verdicts of rendered guard inputs (`format.render_input` layout).

        Raises:
            UserError: an input not in the `Human user: ... AI assistant: ...` layout.
        """
        pairs = []
        for i, text in enumerate(prompts):
            try:
                pairs.append(split_input(text))
            except ValueError as exc:
                raise UserError(f"{self.name}: input {i}: {exc}") from None
        found = self.probabilities(pairs)
        return [verdict_of(p, asked) for p, asked in zip(found, tasks, strict=True)]

    def generate(self, prompts: Sequence[str], *args: Any, **kwargs: Any) -> list[list[Generation]]:
        raise UserError(
            f"{self.name} is an encoder classifier: it writes no reasoning; its verdicts are "
            "mode classifier (or make it the first tier of a cascade over a reasoning guard)"
        )

    def open_fast_stream(self) -> ClassifierStream:
        """Streaming moderation (`stream.py`): each check is one encoder pass over the request
        and the response so far; an encoder has no cache to keep between checks."""
        return ClassifierStream(self)


class ClassifierStream:
    """The stream state of a classifier: nothing kept between checks (see `open_fast_stream`)."""

    def __init__(self, backend: ClassifierBackend) -> None:
        self.backend = backend

    def check(self, prompt: str, tasks: Sequence[str]) -> Any:
        from reasonguard.classifier.inputs import encode_texts
        from reasonguard.infer.fast_stream import StreamCheck

        [verdict] = self.backend.fast_verdicts([prompt], [tuple(tasks)])
        [row] = encode_texts(self.backend.tokenizer, [split_input(prompt)], self.backend.max_length)
        return StreamCheck(verdict, len(row), len(row))

    def close(self) -> None:
        pass
