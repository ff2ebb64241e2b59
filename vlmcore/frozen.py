"""Frozen (Tsimpoukelli et al. 2021): images become k prefix embeddings of a frozen causal LM.

The vision encoder's pooled output is mapped by one linear layer to ``k`` LM input embeddings
(k = 2 in the paper), placed at the image positions of an interleaved image/text sequence. The
vision encoder and the mapping train; the LM stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmcore._checks import check_lm_extras, check_positive_int, check_token_ids
from vlmcore.flamingo import input_embedding_shape
from vlmcore.vision import pooled_features


class FrozenPrefix(nn.Module):
    """Frozen's visual prefix around a transformers causal LM.

    Args:
        vision_encoder: module with a pooled output (:func:`vlmcore.vision.pooled_features`):
            :class:`vlmcore.VisionTransformer` or a :mod:`vlmcore.vision` adapter. Trains.
        lang_model: a transformers causal LM instance. Frozen.
        image_token_id: the placeholder token id marking image positions in ``input_ids``.
        vis_dim: width of the pooled visual feature.
        num_prefix_tokens: k, embeddings per image.

    Image-position convention: every image occupies ``k`` consecutive ``image_token_id``
    placeholders in ``input_ids``; ``images[b, j]`` fills the j-th group of k placeholders of
    sample b (order of appearance). A sample may use fewer images than ``T_img`` (the rest are
    padding and ignored), but its placeholder count must be a multiple of k and at most
    ``k * T_img`` (``ValueError`` otherwise). The LM's own embedding of the placeholder token is
    never used, and labels at placeholder positions are ignored (set to -100).
    """

    def __init__(self, vision_encoder: nn.Module, lang_model: nn.Module, *, image_token_id: int, vis_dim: int,
                 num_prefix_tokens: int = 2):
        super().__init__()
        if not hasattr(lang_model, "get_input_embeddings"):
            raise TypeError("lang_model must be a transformers causal LM (it has no get_input_embeddings)")
        check_positive_int("num_prefix_tokens", num_prefix_tokens)
        check_positive_int("vis_dim", vis_dim)
        embedding = lang_model.get_input_embeddings()
        vocab, lang_dim = input_embedding_shape(embedding)
        if not 0 <= int(image_token_id) < vocab:
            raise ValueError(f"image_token_id must be a token id in [0, {vocab}), got {image_token_id!r}")
        self.vision_encoder = vision_encoder
        self.lang_model = lang_model.requires_grad_(False)
        self.image_token_id = int(image_token_id)
        self.num_prefix_tokens = num_prefix_tokens
        self.vis_dim = vis_dim
        self.lang_dim = lang_dim
        self.visual_prefix = nn.Linear(vis_dim, num_prefix_tokens * lang_dim).to(
            device=embedding.weight.device, dtype=embedding.weight.dtype)

    def prefix_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, T_img, C, H, W]`` -> the k prefix embeddings of each image, ``[B, T_img, k, D_lm]``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 5:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [B, T_img, C, H, W], got {got}")
        batch, num_images = images.shape[:2]
        pooled = pooled_features(self.vision_encoder, images.reshape(batch * num_images, *images.shape[2:]))
        if pooled.dim() != 2 or pooled.shape[-1] != self.vis_dim:
            raise ValueError(f"vision_encoder's pooled output must be [N, vis_dim={self.vis_dim}], "
                             f"got {tuple(pooled.shape)}")
        prefix = self.visual_prefix(pooled.to(self.visual_prefix.weight.dtype))  # [B*T, k*D]
        return prefix.view(batch, num_images, self.num_prefix_tokens, self.lang_dim)

    def embed(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """LM input embeddings ``[B, L, D_lm]`` with the image prefixes at the placeholder positions."""
        if not isinstance(images, torch.Tensor) or images.dim() != 5:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be [B, T_img, C, H, W], got {got}")
        check_token_ids("input_ids", input_ids)
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"input_ids must be [B, L] with B = images.shape[0]; got {tuple(input_ids.shape)} "
                             f"and images {tuple(images.shape)}")
        k = self.num_prefix_tokens
        batch, num_images = images.shape[:2]
        is_image = input_ids == self.image_token_id  # [B, L]
        counts = is_image.sum(dim=1)
        bad = (counts % k != 0) | (counts > k * num_images)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sample {b} has {int(counts[b])} image placeholders; each image needs exactly "
                f"num_prefix_tokens={k} and there are {num_images} images per sample"
            )
        token_embeds = self.lang_model.get_input_embeddings()(input_ids)  # [B, L, D]
        prefix = self.prefix_embeddings(images).to(token_embeds.dtype)  # [B, T, k, D]
        slot = (is_image.to(torch.int64).cumsum(dim=1) - 1).clamp(min=0)  # [B, L]: j*k + i at placeholders
        flat = torch.arange(batch, device=input_ids.device)[:, None] * (num_images * k) + slot  # [B, L]
        placed = prefix.reshape(batch * num_images * k, self.lang_dim)[flat]  # [B, L, D]
        return torch.where(is_image[..., None], placed, token_embeds)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """Run the frozen LM on the interleaved sequence.

        Args:
            images: ``[B, T_img, C, H, W]`` in order of appearance.
            input_ids: ``[B, L]`` with k placeholders per image (see the class docstring).
            attention_mask: ``[B, L]`` as for the LM.
            labels: ``[B, L]`` (-100 ignored); placeholder positions are ignored automatically.
            **kwargs: passed to the LM.

        Returns:
            the LM's output (``.logits [B, L, vocab]``, ``.loss`` when labels are given).
        """
        check_token_ids("input_ids", input_ids)
        check_lm_extras(input_ids, attention_mask, labels, has_past=kwargs.get("past_key_values") is not None,
                        ids_name="input_ids")
        inputs_embeds = self.embed(images, input_ids)
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.image_token_id, -100)
        return self.lang_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **generate_kwargs):
        """HF ``generate`` from the interleaved prompt (passed as ``inputs_embeds``): returns the new tokens only."""
        check_token_ids("input_ids", input_ids)
        check_lm_extras(input_ids, attention_mask, None, has_past=False, ids_name="input_ids")
        inputs_embeds = self.embed(images, input_ids)
        return self.lang_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the LM layers in backward (transformers' checkpointing, non-reentrant, so the
        gradients reach the prefix through the frozen LM)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.lang_model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.lang_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.lang_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The vision encoder's and the mapping's parameters (the LM is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]
