"""OpenFlamingo's few-shot prompts, string for string, and its post-processing of generations.

A k-shot prompt is k demonstrations followed by the query, each demonstration one image and its
answer closed by ``<|endofchunk|>`` (Alayrac et al. 2022; OpenFlamingo ``eval/evaluate.py`` and
``eval/models/open_flamingo.py``)::

    <image>Output:a red circle<|endofchunk|>\\n<image>Output:a blue cross<|endofchunk|>\\n<image>Output:

The 0-shot convention (Flamingo, OpenFlamingo): two demonstrations are still drawn, but their
``<image>`` tags are removed, so the model sees the *format* as text and only the query's image
(:func:`effective_num_shots`). The demos are passed explicitly, so the strings can be compared with
OpenFlamingo's own for the same demos (``tests/eval/test_prompts.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MEDIA, END_OF_CHUNK = "<image>", "<|endofchunk|>"
#: What the zero-shot convention draws instead of no demonstration (OpenFlamingo: 2 text-only shots).
ZERO_SHOT_TEXT_DEMOS = 2


def caption_prompt(caption: str | None = None) -> str:
    """One captioning chunk: ``<image>Output:{caption}<|endofchunk|>``, or the open query ``<image>Output:``."""
    if caption is None:
        return f"{MEDIA}Output:"
    return f"{MEDIA}Output:{caption}{END_OF_CHUNK}"


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """One VQA chunk: ``<image>Question:{q} Short answer:{a}<|endofchunk|>``, or the open query."""
    if answer is None:
        return f"{MEDIA}Question:{question} Short answer:"
    return f"{MEDIA}Question:{question} Short answer:{answer}{END_OF_CHUNK}"


def class_prompt(label: str | None = None) -> str:
    """One classification chunk (OpenFlamingo's ImageNet prompt): the caption chunk with the class name."""
    return caption_prompt(label)


def hateful_memes_prompt(text: str, label: str | None = None) -> str:
    """OpenFlamingo's HatefulMemes chunk: the meme's OCR text, then ``Is it hateful? Answer:{label}``."""
    head = f"{MEDIA}is an image with: '{text}' written on it. Is it hateful? Answer:"
    return head if label is None else f"{head}{label}{END_OF_CHUNK}"


def effective_num_shots(num_shots: int) -> int:
    """Demonstrations to draw for ``num_shots``: ``num_shots``, or 2 text-only ones for 0 shots
    (OpenFlamingo's ``compute_effective_num_shots`` for its Flamingo models)."""
    if isinstance(num_shots, bool) or not isinstance(num_shots, int) or num_shots < 0:
        raise ValueError(f"num_shots must be an int >= 0, got {num_shots!r}")
    return num_shots if num_shots > 0 else ZERO_SHOT_TEXT_DEMOS


@dataclass(frozen=True)
class PromptStyle:
    """How chunks are written: ``caption(text | None)``, ``vqa(question, answer | None)`` and the
    separator after each demonstration."""

    caption: Callable[[str | None], str]
    vqa: Callable[..., str]
    separator: str


def _trainer_caption(caption: str | None = None) -> str:
    return MEDIA if caption is None else f"{MEDIA} {caption} {END_OF_CHUNK}"


def _trainer_vqa(question: str, answer: str | None = None) -> str:
    head = f"{MEDIA} Question: {question} Short answer:"
    return head if answer is None else f"{head} {answer} {END_OF_CHUNK}"


#: OpenFlamingo's prompts, byte for byte (the default).
OPENFLAMINGO = PromptStyle(caption_prompt, vqa_prompt, "\n")
#: The layout vlmcore's trainer writes pairs in (``<image> caption <|endofchunk|>``), words separated
#: by spaces: for models trained here with a word-level tokenizer (the demo), which would otherwise
#: read ``Output:a`` as one unknown word.
TRAINER = PromptStyle(_trainer_caption, _trainer_vqa, " ")
#: The styles by the names configs and the command line use (``data.eval.generation.prompt_style``,
#: ``vlmcore-eval run --prompt-style``).
PROMPT_STYLES = {"openflamingo": OPENFLAMINGO, "trainer": TRAINER}


def _assemble(chunks: Sequence[str], query: str, num_shots: int, separator: str) -> str:
    """``chunks`` joined (each followed by ``separator``) then ``query``; for 0 shots the chunks lose
    their ``<image>`` tags (the query keeps its own)."""
    context = "".join(chunk + separator for chunk in chunks)
    if num_shots == 0:
        context = context.replace(MEDIA, "")
    return context + query


def caption_few_shot_prompt(demo_captions: Sequence[str], num_shots: int, style: PromptStyle = OPENFLAMINGO) -> str:
    """The captioning prompt of OpenFlamingo's ``evaluate_captioning`` for these demonstrations.

    Args:
        demo_captions: the demonstrations' captions in prompt order (``effective_num_shots(num_shots)``
            of them; each is stripped, as OpenFlamingo does).
        num_shots: the shot count asked for (0: the demos are text only).
        style: :data:`OPENFLAMINGO` (default) or :data:`TRAINER`.
    Returns:
        ``"".join(caption_prompt(c) + "\\n" for c in demos) + "<image>Output:"`` (tags removed for 0 shots).
    """
    return _assemble([style.caption(c.strip()) for c in demo_captions], style.caption(None), num_shots,
                     style.separator)


def vqa_few_shot_prompt(demos: Sequence[tuple[str, str]], question: str, num_shots: int,
                        style: PromptStyle = OPENFLAMINGO) -> str:
    """The VQA prompt of OpenFlamingo's ``evaluate_vqa``: ``demos`` are ``(question, first answer)``
    pairs in prompt order, then the open query for ``question`` (tags removed for 0 shots)."""
    return _assemble([style.vqa(q, a) for q, a in demos], style.vqa(question), num_shots, style.separator)


def classification_few_shot_prompt(demo_chunks: Sequence[str], query_chunk: str, num_shots: int) -> str:
    """The prompt of OpenFlamingo's ``evaluate_classification``: the demos' chunks (e.g.
    ``class_prompt(name)``) joined with no separator, then the open query chunk."""
    return _assemble(demo_chunks, query_chunk, num_shots, "")


def postprocess_caption(generation: str) -> str:
    """OpenFlamingo's caption clean-up: the text before a hallucinated next ``Output``, quotes removed."""
    return generation.split("Output", 1)[0].replace('"', "")


def postprocess_vqa(generation: str) -> str:
    """OpenFlamingo's short-answer clean-up: the text before ``Question`` / ``Answer`` / ``Short``, then
    before the first ``", "``."""
    answer = re.split("Question|Answer|Short", generation, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


#: Post-processing by metric family (what ``vlmcore-eval run --metric`` applies to the decoded text).
POSTPROCESS: dict[str, Callable[[str], str]] = {"caption": postprocess_caption, "vqa": postprocess_vqa}
