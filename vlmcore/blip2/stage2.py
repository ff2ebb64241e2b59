"""BLIP-2 (Li et al. 2023) stage 2: the bridge from the Q-Former to any frozen Hugging Face LM.

Semantics of LAVIS ``blip2_models/blip2_opt.py`` / ``blip2_t5.py`` and Hugging Face
``Blip2ForConditionalGeneration``: the Q-Former's query outputs, projected to the LM's width by
``language_projection``, are prepended to the text embeddings (or fill ``<image>`` placeholders);
only the Q-Former's query path and the projection train.
"""

from __future__ import annotations

import torch
from torch import nn

import vlmcore.blip2.convert as convert
from vlmcore._checks import check_lm_extras, check_token_ids
from vlmcore.blip2.qformer import QFormer
from vlmcore.flamingo import Flamingo, input_embedding_shape

# Q-Former parts a stage-2 model does not use (no text input): frozen there, so no optimizer state.
_TEXT_ONLY = ("word_embeddings.", "position_embeddings.")


class Blip2LM(nn.Module):
    """BLIP-2 stage 2: projected Q-Former outputs condition a frozen HF LM (decoder-only or encoder-decoder).

    Args:
        qformer: the :class:`QFormer` (from a stage-1 checkpoint: :meth:`load_qformer_state_dict`).
        lang_model: a transformers causal LM (OPT, Llama, GPT-2, Qwen2, ...) or a seq2seq LM (T5 /
            FLAN-T5; ``config.is_encoder_decoder``). Frozen.
        vision_encoder: optional frozen module ``images -> [B, S, vision_width]`` (eval, no grad).
        image_token_id: optional LM token id of ``<image>`` placeholders: when ``input_ids`` holds
            exactly ``num_query_tokens`` of them per row, the projected queries fill them (HF
            ``Blip2ForConditionalGeneration``); otherwise (or without an id) they are prepended.

    Trainable: the Q-Former's query path (query tokens, embedding LayerNorm, every layer's
    attention, cross-attention and query FFN) and ``language_projection`` (``Linear(hidden, d_lm)``,
    created with the LM embedding's dtype and device). The Q-Former's text embeddings and text FFNs
    are frozen (unused without text).
    """

    def __init__(self, qformer: QFormer, lang_model: nn.Module, vision_encoder: nn.Module | None = None, *,
                 image_token_id: int | None = None):
        super().__init__()
        if not isinstance(qformer, QFormer):
            raise TypeError(f"qformer must be a vlmcore.QFormer, got {type(qformer).__name__}")
        if not hasattr(lang_model, "get_input_embeddings"):
            raise TypeError("lang_model must be a transformers LM (it has no get_input_embeddings)")
        embedding = lang_model.get_input_embeddings()
        vocab, lm_dim = input_embedding_shape(embedding)
        if image_token_id is not None and not 0 <= int(image_token_id) < vocab:
            raise ValueError(f"image_token_id must be a token id in [0, {vocab}), got {image_token_id!r}")
        self.qformer = qformer
        for name, p in qformer.named_parameters():
            if name.startswith(_TEXT_ONLY) or ".ffn." in f".{name}":
                p.requires_grad_(False)
        self.lang_model = lang_model.requires_grad_(False)
        self.vision_encoder = None if vision_encoder is None else vision_encoder.requires_grad_(False).eval()
        self.language_projection = nn.Linear(qformer.hidden_size, lm_dim).to(
            device=embedding.weight.device, dtype=embedding.weight.dtype)
        self.image_token_id = None if image_token_id is None else int(image_token_id)
        config = getattr(lang_model, "config", None)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.max_positions = None
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and not self.is_encoder_decoder:
                self.max_positions = value
                break

    def train(self, mode: bool = True):
        """Set the mode; the frozen vision encoder always stays in eval mode."""
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()
        return self

    # ----------------------------------------------------------------------------- inputs

    def query_embeddings(self, images: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                         image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``language_projection(Q-Former(queries, image))`` ``[B, Q, d_lm]`` in the LM's dtype."""
        if (images is None) == (image_embeds is None):
            raise ValueError("pass exactly one of images and image_embeds")
        if images is not None:
            if self.vision_encoder is None:
                raise ValueError("images were given but this model has no vision_encoder; pass image_embeds")
            with torch.no_grad():
                image_embeds = self.vision_encoder(images)
        query_out = self.qformer.encode_image(image_embeds.to(self.qformer.query_tokens.dtype), image_mask)
        return self.language_projection(query_out.to(self.language_projection.weight.dtype))

    def _build(self, queries: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               labels: torch.Tensor | None):
        """``(inputs_embeds, attention_mask, labels)`` with the queries filled in or prepended."""
        batch, length = input_ids.shape
        num_queries = queries.shape[1]
        if queries.shape[0] != batch:
            raise ValueError(f"the images have batch {queries.shape[0]} but input_ids has batch {batch}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.lang_model.get_input_embeddings()(input_ids)
        placeholders = None if self.image_token_id is None else input_ids == self.image_token_id
        # A host-side shape decision: placeholders are used only when present (one small read).
        if placeholders is not None and placeholders.any():
            counts = placeholders.sum(dim=1)
            if not bool((counts == num_queries).all()):
                raise ValueError(f"input_ids must hold exactly num_query_tokens={num_queries} <image> tokens "
                                 f"(id {self.image_token_id}) per row, got {counts.tolist()}")
            embeds = embeds.masked_scatter(placeholders[..., None], queries.to(embeds.dtype))
            if labels is not None:
                labels = labels.masked_fill(placeholders, -100)
            return embeds, attention_mask, labels
        if self.max_positions is not None and num_queries + length > self.max_positions:
            raise ValueError(f"input_ids has length {length}; with the {num_queries} query embeddings that exceeds "
                             f"the LM's position table ({self.max_positions})")
        embeds = torch.cat([queries.to(embeds.dtype), embeds], dim=1)
        attention_mask = torch.cat([torch.ones(batch, num_queries, dtype=attention_mask.dtype,
                                               device=attention_mask.device), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([torch.full((batch, num_queries), -100, dtype=labels.dtype, device=labels.device),
                                labels], dim=1)
        return embeds, attention_mask, labels

    @staticmethod
    def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor
                       ) -> torch.Tensor:
        """Labels ``[B, L]`` for a decoder-only LM: ``input_ids`` with -100 on each row's first
        ``prompt_lengths[b]`` tokens (the prompt) and on padding (``attention_mask == 0``)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        ignore = (positions[None, :] < prompt_lengths[:, None]) | (attention_mask == 0)
        return input_ids.masked_fill(ignore, -100)

    def _check_text(self, input_ids, attention_mask, labels, images, image_embeds) -> None:
        """Raise unless ``input_ids`` ``[B, L]``, its mask / labels and the images agree (one batch ``B``)."""
        check_token_ids("input_ids", input_ids)
        check_lm_extras(input_ids, attention_mask, None if self.is_encoder_decoder else labels,
                        has_past=False, ids_name="input_ids")
        source = images if images is not None else image_embeds
        if isinstance(source, torch.Tensor) and source.dim() > 0 and source.shape[0] != input_ids.shape[0]:
            name = "images" if images is not None else "image_embeds"
            raise ValueError(f"{name} has batch {source.shape[0]} but input_ids has batch {input_ids.shape[0]}")

    # ----------------------------------------------------------------------------- forward & generate

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None, **kwargs):
        """LM output conditioned on the images (``.logits``, ``.loss`` when ``labels``).

        Decoder-only: ``input_ids`` ``[B, L]`` = prompt + caption, ``labels`` ``[B, L]`` with -100 on
        the prompt and padding (:meth:`caption_labels`); the queries' positions get -100 too. The
        logits cover ``[queries; input_ids]`` (or ``input_ids`` with filled placeholders).
        Encoder-decoder: ``input_ids`` = the prefix text (encoder, after the queries), ``labels`` =
        the decoder target ``[B, T]`` (-100 on padding), ``decoder_attention_mask`` optional.
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        self._check_text(input_ids, attention_mask, labels, images, image_embeds)
        queries = self.query_embeddings(images, image_embeds, image_mask)
        if self.is_encoder_decoder:
            embeds, mask, _ = self._build(queries, input_ids, attention_mask, None)
            return self.lang_model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                                   decoder_attention_mask=decoder_attention_mask, **kwargs)
        embeds, mask, labels = self._build(queries, input_ids, attention_mask, labels)
        return self.lang_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, images: torch.Tensor | None = None, prompt_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, image_embeds: torch.Tensor | None = None,
                 image_mask: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """The LM's own ``generate`` (greedy, ``num_beams``, ``do_sample``/``top_p``, ...) from
        ``inputs_embeds`` = queries + prompt. Returns the generated token ids only (no prompt), as
        transformers does for ``inputs_embeds`` input. ``prompt_ids`` ``[B, L]`` (``L >= 1``; a BOS token
        for plain captioning)."""
        if prompt_ids is None:
            raise ValueError("prompt_ids is required (e.g. the LM's BOS token per row)")
        self._check_text(prompt_ids, attention_mask, None, images, image_embeds)
        queries = self.query_embeddings(images, image_embeds, image_mask)
        embeds, mask, _ = self._build(queries, prompt_ids, attention_mask, None)
        generate_kwargs.setdefault("use_cache", True)
        return self.lang_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    # ----------------------------------------------------------------------------- weights

    def load_qformer_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Start from a stage-1 checkpoint: the ``qformer.*`` keys of :class:`Blip2Stage1` that stage 2
        uses (the query path; the text embeddings and text FFNs are ignored, so the stage-1 text
        vocabulary may differ). ``strict``: every query-path parameter must be there."""
        used = {f"qformer.{k}": k for k, p in self.qformer.named_parameters() if p.requires_grad}
        mapped = {used[k]: (k, v) for k, v in state_dict.items() if k in used}
        convert.load_mapped(self.qformer, mapped, strict=strict, source="stage-1 checkpoint",
                            expected=list(used.values()))

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """:func:`vlmcore.blip2.convert.load_hf_stage2_state_dict` (``Blip2ForConditionalGeneration`` bridge)."""
        return convert.load_hf_stage2_state_dict(self, state_dict, strict=strict)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (query path of the Q-Former, ``language_projection``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (``qformer.*``, ``language_projection.*``)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    # Same checked copy / safetensors files as Flamingo (they only use trainable_state_dict).
    load_trainable_state_dict = Flamingo.load_trainable_state_dict
    save_trainable = Flamingo.save_trainable
    load_trainable = Flamingo.load_trainable


__all__ = ["Blip2LM"]
