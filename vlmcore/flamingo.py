"""Flamingo over any Hugging Face causal LM: frozen vision encoder, Perceiver Resampler, gated
cross-attention blocks inserted before every n-th decoder layer of a frozen LM.

The LM keeps its own ``forward`` and ``generate``: its decoder layers that get a cross-attention
block are replaced by a thin :class:`FlamingoLayer` wrapper (OpenFlamingo's placement: the block
runs before the layer), and a hook on the LM's input embedding reads the token ids of every call
to find the ``<image>`` tokens. Everything visual reaches the layers through one shared state:
the resampled media and the per-token image index, computed once per LM call and shared by all
blocks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmcore._checks import check_lm_extras, check_positive_int, check_token_ids
from vlmcore.cross_attention import GatedCrossAttentionBlock, check_media_index
from vlmcore.kernels import media_index_from_locations
from vlmcore.resampler import PerceiverResampler

# Where the decoder layers live in common transformers causal LMs, tried before the generic search.
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon, GPT-Neo
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers around a text model
)

BRIDGE_PREFIXES = ("perceiver.", "gated_cross_attn_layers.", "new_token_embeddings")


def input_embedding_shape(embedding: nn.Module) -> tuple[int, int]:
    """``(vocab, dim)`` of an input embedding, from the module's attributes when it has them (a
    ZeRO-3-partitioned weight has an empty shape), else from its weight."""
    if isinstance(getattr(embedding, "num_embeddings", None), int):
        return embedding.num_embeddings, embedding.embedding_dim
    return tuple(embedding.weight.shape)


def find_decoder_layers(lang_model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Locate the decoder-layer stack of a causal LM: ``(parent, attribute name, the ModuleList)``.

    Known attribute paths first (:data:`DECODER_LAYER_PATHS`), then the longest ``nn.ModuleList``
    in the model whose entries all share one class. Raises ``ValueError`` when nothing fits.
    """
    for path in DECODER_LAYER_PATHS:
        parent, found = None, lang_model
        for part in path.split("."):
            parent, found = found, getattr(found, part, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return parent, path.rsplit(".", 1)[-1], found
    best = None
    for parent in lang_model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and len({type(m) for m in child}) == 1:
                if best is None or len(child) > len(best[2]):
                    best = (parent, child_name, child)
    if best is None:
        raise ValueError(f"could not find the decoder layers of {type(lang_model).__name__} (no nn.ModuleList)")
    return best


class _MediaState:
    """What the wrapped layers read: resampled media and each text token's image index.

    ``media`` ``[B, M, R, D]`` or None (plain LM); ``index`` ``[B, L]`` for the current LM call;
    ``cached``: media conditioned once for several calls (generation); ``last_index`` ``[B]``: the
    last image of each row seen by the first cached call (later tokens attend it).
    """

    def __init__(self):
        self.media: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.cached = False
        self.last_index: torch.Tensor | None = None

    def clear(self) -> None:
        self.media = self.index = self.last_index = None
        self.cached = False


class FlamingoLayer(nn.Module):
    """A decoder layer with a gated cross-attention block run on its input hidden states.

    The block is not registered here (it belongs to ``Flamingo.gated_cross_attn_layers``), so the
    LM's own parameters stay exactly the LM's. Attributes not found on the wrapper are read from
    the wrapped layer (``attention_type``, ``layer_idx``, ...), so the LM's forward is unchanged.
    """

    def __init__(self, decoder_layer: nn.Module, block: GatedCrossAttentionBlock, state: _MediaState,
                 owner_flags: dict):
        super().__init__()
        self.decoder_layer = decoder_layer
        self._bridge = (block, state, owner_flags)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # read __dict__ directly: during unpickling / deepcopy nothing is set up yet
            inner = self.__dict__.get("_modules", {}).get("decoder_layer")
            if inner is None or name == "decoder_layer":
                raise
            return getattr(inner, name)

    def _cross_attend(self, hidden_states: torch.Tensor) -> torch.Tensor:
        block, state, flags = self._bridge
        if state.media is None:
            return hidden_states
        if state.index is None or state.index.shape != hidden_states.shape[:2]:
            raise RuntimeError(
                "Flamingo: the image index does not match the hidden states of this layer "
                f"({None if state.index is None else tuple(state.index.shape)} vs {tuple(hidden_states.shape[:2])}); "
                "call the LM with input_ids (not inputs_embeds) so the <image> tokens can be found"
            )
        if flags["gradient_checkpointing"] and self.training and torch.is_grad_enabled():
            return checkpoint(block, hidden_states, state.media, None, state.index, use_reentrant=False,
                              validate_index=False)
        return block(hidden_states, state.media, media_index=state.index, validate_index=False)

    def forward(self, *args, **kwargs):
        if args:
            args = (self._cross_attend(args[0]),) + args[1:]
        else:
            kwargs["hidden_states"] = self._cross_attend(kwargs["hidden_states"])
        return self.decoder_layer(*args, **kwargs)


class Flamingo(nn.Module):
    """Flamingo (Alayrac et al. 2022; OpenFlamingo layout) around a frozen transformers causal LM.

    Args:
        vision_encoder: module mapping images ``[N, C, H, W]`` to tokens ``[N, v, vis_dim]``
            (:class:`vlmcore.VisionTransformer` or an adapter of :mod:`vlmcore.vision`). Frozen,
            run under ``no_grad`` and kept in eval mode.
        lang_model: a transformers causal LM instance (GPT-2, OPT, Llama, Mistral, Qwen2, ...). Frozen.
            Its decoder layers are found by :func:`find_decoder_layers`; its input embedding must be
            called with the token ids (as every HF causal LM does).
        media_token_id: id of the ``<image>`` token in ``lang_x``.
        vis_dim: width of the vision tokens.
        cross_attn_every_n_layers: a block before every n-th decoder layer (layers n-1, 2n-1, ...).
        num_latents, resampler_depth: Perceiver Resampler size.
        max_num_frames: None (images only) or the most frames per media: the resampler then adds a
            learned time embedding per frame (OpenFlamingo's ``frame_embs``) before flattening the
            ``F x v`` tokens of a clip, so the latents can tell frame order.
        dim_head, heads: cross-attention (and resampler) head size and count.
        only_attend_immediate_media: True: a token attends only its own (last) image.
        ff_mult: feed-forward expansion of the gated blocks and the resampler.
        train_new_token_embeddings: False; True to train the input embedding of ``media_token_id``;
            or a sequence of token ids (e.g. ``<image>`` and ``<|endofchunk|>``) whose input
            embeddings train. Kept as a separate parameter ``new_token_embeddings`` (initialized from
            the LM's rows) so the LM's embedding matrix stays frozen.
        gradient_checkpointing: recompute the gated blocks, the resampler layers and (through
            ``gradient_checkpointing_enable`` of the LM, non-reentrant) the LM layers in backward.

    The bridge (resampler ``perceiver``, ``gated_cross_attn_layers``, ``new_token_embeddings``) is
    created with the dtype and device of the LM's input embedding. Gates start at 0, so at init
    the logits equal the frozen LM's exactly.

    Media convention: ``vision_x`` ``[B, T_img, F, C, H, W]``; the k-th ``<image>`` token of sample
    b stands for image (F = 1) or clip (F frames) ``vision_x[b, k]``; text after it (up to the next
    ``<image>``) attends that media (``only_attend_immediate_media``) or all media so far. Text
    before the first ``<image>`` attends nothing. More ``<image>`` tokens than media raises
    ``ValueError``. ``frame_mask`` ``[B, T_img, F]`` (bool, False = a padding frame) keeps the
    resampler from attending padding frames of short clips.
    """

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_model: nn.Module,
        *,
        media_token_id: int,
        vis_dim: int,
        cross_attn_every_n_layers: int = 1,
        num_latents: int = 64,
        resampler_depth: int = 6,
        dim_head: int = 64,
        heads: int = 8,
        only_attend_immediate_media: bool = True,
        ff_mult: int = 4,
        train_new_token_embeddings: bool | Sequence[int] = False,
        gradient_checkpointing: bool = False,
        max_num_frames: int | None = None,
    ):
        super().__init__()
        if not hasattr(lang_model, "get_input_embeddings"):
            raise TypeError("lang_model must be a transformers causal LM (it has no get_input_embeddings)")
        check_positive_int("cross_attn_every_n_layers", cross_attn_every_n_layers)
        check_positive_int("vis_dim", vis_dim)
        embedding = lang_model.get_input_embeddings()
        vocab, embed_dim = input_embedding_shape(embedding)
        if not 0 <= int(media_token_id) < vocab:
            raise ValueError(f"media_token_id must be a token id in [0, {vocab}), got {media_token_id!r}")
        config = getattr(lang_model, "config", None)
        lang_dim = int(getattr(config, "hidden_size", None) or embed_dim)
        parent, attr, layers = find_decoder_layers(lang_model)
        if len(layers) < cross_attn_every_n_layers:
            raise ValueError(
                f"cross_attn_every_n_layers={cross_attn_every_n_layers} exceeds the LM's {len(layers)} layers")

        self.vision_encoder = vision_encoder.requires_grad_(False).eval()
        self.lang_model = lang_model.requires_grad_(False)
        self.media_token_id = int(media_token_id)
        self.vis_dim = vis_dim
        self.cross_attn_every_n_layers = cross_attn_every_n_layers
        factory = {"device": embedding.weight.device, "dtype": embedding.weight.dtype}
        self.perceiver = PerceiverResampler(vis_dim, depth=resampler_depth, dim_head=dim_head, heads=heads,
                                            num_latents=num_latents, max_num_frames=max_num_frames,
                                            ff_mult=ff_mult).to(**factory)
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(lang_dim, vis_dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult,
                                     only_attend_immediate_media=only_attend_immediate_media).to(**factory)
            for i in range(len(layers)) if (i + 1) % cross_attn_every_n_layers == 0
        )
        self.cross_attn_layer_indices = [i for i in range(len(layers)) if (i + 1) % cross_attn_every_n_layers == 0]
        self._state = _MediaState()
        self._flags = {"gradient_checkpointing": False}
        blocks = iter(self.gated_cross_attn_layers)
        wrapped = [
            FlamingoLayer(layer, next(blocks), self._state, self._flags) if (i + 1) % cross_attn_every_n_layers == 0
            else layer
            for i, layer in enumerate(layers)
        ]
        setattr(parent, attr, nn.ModuleList(wrapped))

        new_ids = ()
        if train_new_token_embeddings is True:
            new_ids = (self.media_token_id,)
        elif train_new_token_embeddings:
            new_ids = tuple(int(i) for i in train_new_token_embeddings)
            if any(not 0 <= i < vocab for i in new_ids):
                raise ValueError(f"train_new_token_embeddings ids must lie in [0, {vocab}), got {new_ids}")
        self.register_buffer("new_token_ids", torch.tensor(new_ids, dtype=torch.int64, device=factory["device"]),
                             persistent=False)
        self.new_token_embeddings = (
            nn.Parameter(embedding.weight[list(new_ids)].detach().clone()) if new_ids else None
        )
        embedding.register_forward_hook(self._on_embedding, with_kwargs=True)
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # ----------------------------------------------------------------------------- state & hooks

    def _on_embedding(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Every LM call embeds its token ids here: compute the image index, swap trained rows."""
        input_ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        state = self._state
        if state.media is not None:
            self._set_media_index(input_ids)
        if self.new_token_embeddings is not None:
            hits = input_ids[..., None] == self.new_token_ids  # [B, L, k]
            rows = hits.to(output.dtype) @ self.new_token_embeddings.to(output.dtype)  # [B, L, D]
            output = torch.where(hits.any(dim=-1, keepdim=True), rows, output)
        return output

    def _set_media_index(self, input_ids: torch.Tensor) -> None:
        state = self._state
        batch, length = input_ids.shape
        media_batch = state.media.shape[0]
        if media_batch != batch:
            # generate() expands the batch (beams, return sequences) by repeat_interleave.
            if batch % media_batch != 0:
                raise ValueError(f"the LM was called with batch {batch}, not a multiple of the media batch "
                                 f"{media_batch}")
            state.media = state.media.repeat_interleave(batch // media_batch, dim=0)
            if state.last_index is not None:
                state.last_index = state.last_index.repeat_interleave(batch // media_batch, dim=0)
        if state.cached and state.last_index is not None:
            state.index = state.last_index[:, None].expand(batch, length)
            return
        index = media_index_from_locations(input_ids == self.media_token_id)
        check_media_index(index, state.media.shape[1], name="image index (from the <image> tokens of lang_x)")
        if state.cached:
            state.last_index = index[:, -1].clone()
        state.index = index

    def encode_vision(self, vision_x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen encoder (no grad), then resampler.

        ``[B, T_img, F, C, H, W]`` -> ``[B, T_img, num_latents, vis_dim]``; ``frame_mask``: optional
        bool ``[B, T_img, F]``, False = a padding frame whose tokens the latents do not attend.
        """
        if not isinstance(vision_x, torch.Tensor) or vision_x.dim() != 6:
            got = tuple(vision_x.shape) if isinstance(vision_x, torch.Tensor) else type(vision_x).__name__
            raise ValueError(f"vision_x must be [B, T_img, F, C, H, W], got {got}")
        batch, num_media, frames = vision_x.shape[:3]
        with torch.no_grad():
            tokens = self.vision_encoder(vision_x.reshape(batch * num_media * frames, *vision_x.shape[3:]))
        if tokens.dim() != 3 or tokens.shape[-1] != self.vis_dim:
            raise ValueError(f"vision_encoder must return [N, v, vis_dim={self.vis_dim}], got {tuple(tokens.shape)}")
        tokens = tokens.reshape(batch, num_media, frames, tokens.shape[1], self.vis_dim)
        media_mask = None
        if frame_mask is not None:
            if tuple(frame_mask.shape) != (batch, num_media, frames) or frame_mask.dtype != torch.bool:
                raise ValueError(f"frame_mask must be bool [B, T_img, F] = {(batch, num_media, frames)}, got "
                                 f"{frame_mask.dtype} {tuple(frame_mask.shape)}")
            media_mask = frame_mask.repeat_interleave(tokens.shape[3], dim=2)  # [B, T_img, F*v]
        return self.perceiver(tokens.to(self.perceiver.latents.dtype), media_mask=media_mask)

    @staticmethod
    def _check_batch(vision_x: torch.Tensor, lang_x: torch.Tensor) -> None:
        """``ValueError`` unless ``vision_x`` (when a tensor) has one sample per row of ``lang_x``."""
        if isinstance(vision_x, torch.Tensor) and vision_x.dim() > 0 and vision_x.shape[0] != lang_x.shape[0]:
            raise ValueError(f"vision_x has batch {vision_x.shape[0]} but lang_x has batch {lang_x.shape[0]}; "
                             "they must match (one sample's images per row of lang_x)")

    def cache_media(self, vision_x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> None:
        """Condition on ``vision_x`` (and its ``frame_mask``) for the following LM calls (generation,
        incremental decoding).

        The first LM call after this finds the ``<image>`` tokens of its ``input_ids`` as usual
        and remembers each row's last image; every token of later calls attends that image.
        """
        self._state.clear()
        self._state.media = self.encode_vision(vision_x, frame_mask)
        self._state.cached = True

    def uncache_media(self) -> None:
        """Forget the conditioned media; the LM runs as the plain LM until the next conditioning."""
        self._state.clear()

    # ----------------------------------------------------------------------------- forward & generate

    def forward(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None, **kwargs):
        """Run the LM conditioned on images.

        Args:
            vision_x: ``[B, T_img, F, C, H, W]``, or None to use media cached by :meth:`cache_media`.
            lang_x: ``[B, L]`` token ids with ``media_token_id`` at image positions.
            attention_mask, labels: as for the LM (labels -100 = ignored).
            frame_mask: optional bool ``[B, T_img, F]``: False marks a padding frame of a short clip.
            **kwargs: passed to the LM (``past_key_values``, ``use_cache``, ...).

        Returns:
            the LM's output (``CausalLMOutputWithPast``: ``.logits [B, L, vocab]``, ``.loss``, ...).

        Raises ``TypeError``/``ValueError`` naming the argument when ``lang_x`` is not integer
        ``[B, L]``, ``vision_x`` has another batch, or ``attention_mask``/``labels`` do not match
        ``lang_x`` (a 2-D mask may be longer, ``[B, past + L]``, with ``past_key_values``).
        """
        check_token_ids("lang_x", lang_x)
        check_lm_extras(lang_x, attention_mask, labels, has_past=kwargs.get("past_key_values") is not None,
                        ids_name="lang_x")
        if vision_x is None:
            if not self._state.cached:
                raise ValueError("vision_x is None but no media is cached; pass images or call cache_media first")
            if frame_mask is not None:
                raise ValueError("frame_mask without vision_x: pass it to cache_media with the cached media")
            return self.lang_model(input_ids=lang_x, attention_mask=attention_mask, labels=labels, **kwargs)
        if self._state.cached:
            raise ValueError("media is cached (cache_media); call uncache_media() before passing vision_x")
        self._check_batch(vision_x, lang_x)
        self._state.media = self.encode_vision(vision_x, frame_mask)
        try:
            return self.lang_model(input_ids=lang_x, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            self._state.clear()

    @torch.no_grad()
    def generate(self, vision_x: torch.Tensor, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 frame_mask: torch.Tensor | None = None, **generate_kwargs):
        """HF ``generate`` on the LM with the images conditioned once (KV cache on).

        Greedy, beam search (``num_beams``) and sampling (``do_sample=True, top_p=0.9``) all work:
        the media follow the batch expansion of beams / return sequences. Prompt tokens attend
        their image as in :meth:`forward`; every generated token attends the last image of its
        prompt. Returns the LM's ``generate`` output (prompt + new tokens).
        """
        check_token_ids("lang_x", lang_x)
        check_lm_extras(lang_x, attention_mask, None, has_past=False, ids_name="lang_x")
        self._check_batch(vision_x, lang_x)
        self.cache_media(vision_x, frame_mask)
        try:
            generate_kwargs.setdefault("use_cache", True)
            return self.lang_model.generate(input_ids=lang_x, attention_mask=attention_mask, **generate_kwargs)
        finally:
            self.uncache_media()

    def train(self, mode: bool = True):
        """Set the mode of the bridge and the LM; the frozen vision encoder always stays in eval mode."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the gated blocks, resampler layers and LM layers (non-reentrant) in backward."""
        self._flags["gradient_checkpointing"] = True
        self.perceiver.gradient_checkpointing = True
        # Non-reentrant: the LM's inputs do not require grad (frozen embeddings) and the
        # reentrant variant would then drop the gradients of the bridge.
        if hasattr(self.lang_model, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.lang_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(self.lang_model, "gradient_checkpointing_enable"):
            self.lang_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        """Undo :meth:`gradient_checkpointing_enable`."""
        self._flags["gradient_checkpointing"] = False
        self.perceiver.gradient_checkpointing = False
        if hasattr(self.lang_model, "activation_checkpointing_disable"):
            self.lang_model.activation_checkpointing_disable()
        elif hasattr(self.lang_model, "gradient_checkpointing_disable"):
            self.lang_model.gradient_checkpointing_disable()

    @property
    def gradient_checkpointing(self) -> bool:
        return self._flags["gradient_checkpointing"]

    # ----------------------------------------------------------------------------- trainable state

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (resampler, gated blocks, new token embeddings), for the optimizer."""
        return [p for _, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The bridge's parameters by name: ``perceiver.*``, ``gated_cross_attn_layers.*``, ``new_token_embeddings``."""
        return {name: p.detach() for name, p in self.named_parameters() if name.startswith(BRIDGE_PREFIXES)}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy bridge weights in; ``ValueError`` on mismatched shapes (and, if ``strict``, on missing/extra keys)."""
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if strict and (missing or unexpected):
            raise ValueError(f"trainable state mismatch: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        mismatched = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
        ]
        if mismatched:
            raise ValueError("trainable state has mismatched shapes (different model config?): "
                             + "; ".join(mismatched[:8]))
        with torch.no_grad():
            for k, p in own.items():
                if k in state_dict:
                    p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))

    def save_trainable(self, path: str | os.PathLike) -> None:
        """Write :meth:`trainable_state_dict` to a safetensors file."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}, str(path))

    def load_trainable(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Read a safetensors file written by :meth:`save_trainable` (see :meth:`load_trainable_state_dict`)."""
        from safetensors.torch import load_file

        self.load_trainable_state_dict(load_file(str(path)), strict=strict)
