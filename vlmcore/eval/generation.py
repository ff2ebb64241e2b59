"""Decoding text from the generative families, behind one interface for the evaluation loops.

An *eval model* takes, per sample, its images (the demonstrations' then the query's, each
``[C, H, W]``) and its prompt text (``<image>`` where an image goes), and returns decoded text:

- :class:`FlamingoEval` — :class:`vlmcore.Flamingo`: every ``<image>`` of the prompt is an image;
  media encoded once per prompt (``generate`` conditions them once, KV cache on); also scores
  class names by log-likelihood (:meth:`FlamingoEval.class_logprobs`, OpenFlamingo's
  ``get_rank_classifications``).
- :class:`FrozenEval` — :class:`vlmcore.FrozenPrefix`: each ``<image>`` becomes its ``k`` prefix slots.
- :class:`Blip2Eval` — :class:`vlmcore.Blip2LM`: the query image fills the ``num_query_tokens``
  placeholders put in front of the prompt; BLIP-2 conditions on one image, so the demonstrations
  stay in the prompt as text (their ``<image>`` tags removed).
- :class:`BlipEval` — :class:`vlmcore.BLIP` captioning: one image, the captioner's own prompt
  (BLIP's ``"a picture of "``); no in-context demonstrations.

``tokenizer``: any object with ``encode(text) -> list[int]`` (special tokens written in the text
recognized, nothing added), ``decode(ids) -> str``, ``pad_token_id``, ``eos_token_id`` and, for the
in-context families, ``media_token_id`` / ``eoc_token_id`` (``vlmcore.train``'s ``Tokenizer`` is one).
Decoding stops at ``<|endofchunk|>`` or the end-of-text token (OpenFlamingo stops at the former).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vlmcore.eval.prompts import MEDIA

Images = Sequence[Sequence[torch.Tensor]]  # per sample: its images [C, H, W], in prompt order


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the module's first floating parameter."""
    p = next(p for p in module.parameters() if p.dtype.is_floating_point)
    return p.device, p.dtype


class EvalModel:
    """The shared part: tokenizing a batch of prompts (left padded), decoding generated ids."""

    def __init__(self, model: nn.Module, tokenizer):
        self.model, self.tok = model, tokenizer
        self.device, self.dtype = _placement(model)
        self.stop_ids = [i for i in (getattr(tokenizer, "eoc_token_id", None), tokenizer.eos_token_id) if i is not None]
        self.skip_ids = set(self.stop_ids) | {tokenizer.pad_token_id, getattr(tokenizer, "media_token_id", None)}

    def _token_rows(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask ``[B, L]`` (generation continues every row at its end)."""
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    def decode(self, new_ids: torch.Tensor) -> list[str]:
        """Each row of generated ids ``[B, T]`` up to its first stop token, special tokens dropped."""
        texts = []
        for row in new_ids.tolist():
            stop = next((j for j, t in enumerate(row) if t in self.stop_ids), len(row))
            texts.append(self.tok.decode([t for t in row[:stop] if t not in self.skip_ids]).strip())
        return texts

    def generation_kwargs(self, max_new_tokens: int, num_beams: int, length_penalty: float,
                          min_new_tokens: int) -> dict:
        """HF ``generate`` options: OpenFlamingo's (beam search, max / min new tokens, length penalty)."""
        return dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                    length_penalty=length_penalty, do_sample=False, eos_token_id=self.stop_ids,
                    pad_token_id=self.tok.pad_token_id)

    @staticmethod
    def _check_counts(images: Images, prompts: Sequence[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image lists for {len(prompts)} prompts")
        for i, (row, prompt) in enumerate(zip(images, prompts)):
            if prompt.count(MEDIA) != len(row):
                raise ValueError(f"prompt {i} has {prompt.count(MEDIA)} {MEDIA} tags but {len(row)} images: {prompt!r}")


class FlamingoEval(EvalModel):
    """:class:`vlmcore.Flamingo` (see the module docstring)."""

    def inputs(self, images: Images, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``vision_x [B, T_max, 1, C, H, W]`` (zero padded), left-padded ``lang_x`` and mask ``[B, L]``."""
        self._check_counts(images, prompts)
        first = images[0][0]
        vision_x = torch.zeros(len(images), max(len(r) for r in images), 1, *first.shape)
        for b, row in enumerate(images):
            for t, image in enumerate(row):
                vision_x[b, t, 0] = image
        ids, mask = self._token_rows([self.tok.encode(p) for p in prompts])
        return vision_x.to(self.device, self.dtype), ids, mask

    @torch.no_grad()
    def generate(self, images: Images, prompts: Sequence[str], *, max_new_tokens: int = 20, num_beams: int = 3,
                 length_penalty: float = 0.0, min_new_tokens: int = 0) -> list[str]:
        """Decoded continuations of the prompts (the prompt itself cut off)."""
        vision_x, ids, mask = self.inputs(images, prompts)
        out = self.model.generate(vision_x, ids, attention_mask=mask, **self.generation_kwargs(
            max_new_tokens, num_beams, length_penalty, min_new_tokens))
        return self.decode(out[:, ids.shape[1]:])

    @torch.no_grad()
    def class_logprobs(self, images: Images, prompts: Sequence[str], class_names: Sequence[str],
                       normalize_length: bool = True) -> torch.Tensor:
        """Log-likelihood ``[B, num_classes]`` of each class name right after each prompt.

        The prompt (media included) runs once with the KV cache; each class name then runs on a
        copy of that cache. A name's score is the mean (``normalize_length``) or sum of
        its tokens' log-probabilities, as OpenFlamingo's ``get_rank_classifications``; unlike it,
        the name's tokens keep the prompt's padding mask.
        """
        vision_x, ids, mask = self.inputs(images, prompts)
        self.model.cache_media(vision_x)
        try:
            context = self.model(None, ids, attention_mask=mask, use_cache=True)
            cache, last_logits = context.past_key_values, context.logits[:, -1:]
            scores = []
            for name in class_names:
                name_ids = torch.tensor(self.tok.encode(name), device=self.device).expand(ids.shape[0], -1)
                # a copy per name: transformers' caches grow in place (and their crop API differs by version)
                out = self.model(None, name_ids, attention_mask=torch.cat([mask, torch.ones_like(name_ids)], 1),
                                 past_key_values=copy.deepcopy(cache), use_cache=True)
                logits = torch.cat([last_logits, out.logits[:, :-1]], dim=1).float()  # predicts each name token
                token_logprobs = logits.log_softmax(-1).gather(2, name_ids[..., None]).squeeze(-1)  # [B, n]
                scores.append(token_logprobs.mean(1) if normalize_length else token_logprobs.sum(1))
        finally:
            self.model.uncache_media()
        return torch.stack(scores, dim=1).cpu()


class FrozenEval(EvalModel):
    """:class:`vlmcore.FrozenPrefix`: ``<image>`` -> ``num_prefix_tokens`` placeholders."""

    @torch.no_grad()
    def generate(self, images: Images, prompts: Sequence[str], *, max_new_tokens: int = 20, num_beams: int = 3,
                 length_penalty: float = 0.0, min_new_tokens: int = 0) -> list[str]:
        self._check_counts(images, prompts)
        media, k = self.tok.media_token_id, self.model.num_prefix_tokens
        rows = [[t for token in self.tok.encode(p) for t in ([token] * k if token == media else [token])]
                for p in prompts]
        ids, mask = self._token_rows(rows)
        stacked = torch.zeros(len(images), max(len(r) for r in images), *images[0][0].shape)
        for b, row in enumerate(images):
            for t, image in enumerate(row):
                stacked[b, t] = image
        out = self.model.generate(stacked.to(self.device, self.dtype), ids, attention_mask=mask,
                                  **self.generation_kwargs(max_new_tokens, num_beams, length_penalty, min_new_tokens))
        return self.decode(out)


class Blip2Eval(EvalModel):
    """:class:`vlmcore.Blip2LM`: the query image (the last of each sample) as the soft visual prompt."""

    @torch.no_grad()
    def generate(self, images: Images, prompts: Sequence[str], *, max_new_tokens: int = 20, num_beams: int = 3,
                 length_penalty: float = 0.0, min_new_tokens: int = 0) -> list[str]:
        self._check_counts(images, prompts)
        queries = [self.model.image_token_id] * self.model.qformer.num_query_tokens
        # T5's encoder input ends with </s> (its tokenizer adds it; LAVIS blip2_t5 feeds the prompt so)
        end = [self.tok.eos_token_id] if self.model.is_encoder_decoder else []
        # Everything but the query's own image stays text: the demos' tags go, the query's becomes the queries.
        rows = [queries + self.tok.encode(p.replace(MEDIA, "")) + end for p in prompts]
        ids, mask = self._token_rows(rows)
        pixels = torch.stack([row[-1] for row in images]).to(self.device, self.dtype)
        out = self.model.generate(pixels, ids, attention_mask=mask, **self.generation_kwargs(
            max_new_tokens, num_beams, length_penalty, min_new_tokens))
        return self.decode(out)


class BlipEval:
    """:class:`vlmcore.BLIP` captioning with its own prompt (``prompt_ids``: the tokens of BLIP's
    ``"a picture of "``); ``decode`` maps the generated caption ids to text."""

    def __init__(self, model: nn.Module, prompt_ids: Sequence[int], decode: Callable[[list[int]], str]):
        self.model, self.prompt_ids, self._decode = model, list(prompt_ids), decode
        self.device, self.dtype = _placement(model)

    @torch.no_grad()
    def generate(self, images: Images, prompts: Sequence[str], *, max_new_tokens: int = 20, num_beams: int = 3,
                 length_penalty: float = 0.0, min_new_tokens: int = 0) -> list[str]:
        """Captions of the single image of each sample (the prompts are BLIP's own, see the class)."""
        if any(len(row) != 1 for row in images):
            raise ValueError("BLIP captions one image per sample; it takes no in-context demonstrations")
        pixels = torch.stack([row[0] for row in images]).to(self.device, self.dtype)
        prompt_length = 1 + len(self.prompt_ids)  # [DEC] + prompt: BLIP's lengths count them
        out = self.model.generate(pixels, self.prompt_ids, num_beams=num_beams, length_penalty=length_penalty,
                                  max_length=prompt_length + max_new_tokens, min_length=prompt_length + min_new_tokens)
        return [self._decode(row).strip() for row in out.tolist()]
