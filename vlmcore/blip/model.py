"""BLIP (Li et al. 2022): image encoder + MED text transformer, ITC, ITM and captioning.

:class:`BLIP` composes the vision tower, the MED text transformer of :mod:`vlmcore.blip.text`
(unimodal encoder, image-grounded encoder, image-grounded decoder), the ITC projections, the ITM
head and the LM head, with BLIP's momentum encoders and queues. Parameter names follow Hugging
Face ``transformers`` (``BlipForImageTextRetrieval`` and ``BlipForConditionalGeneration``).
Loading Hugging Face and salesforce/BLIP weights: :mod:`vlmcore.blip.convert` (the ``load_*``
methods delegate there); building, saving and loading whole models: :mod:`vlmcore.blip.build`.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

import vlmcore.blip.convert as convert
import vlmcore.hard_negatives as hard_negatives
from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.blip.text import DecoderCache, LMHead, MEDConfig, MEDTextModel, with_first_token
from vlmcore.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world
from vlmcore.kernels import momentum_contrastive_loss
from vlmcore.retrieval import recall_at_k, with_mean_recall
from vlmcore.vision import HFVisionAdapter, vision_width


def blip_vision_encoder(**vision_config) -> HFVisionAdapter:
    """BLIP's ViT as a transformers ``BlipVisionModel`` (random init) in :class:`HFVisionAdapter`.

    Keyword arguments go to ``BlipVisionConfig`` (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``intermediate_size``, ``image_size``, ``patch_size``, ...). This is
    the encoder whose weights load from HF BLIP checkpoints (``vision_model.*``).
    """
    from transformers import BlipVisionConfig, BlipVisionModel

    # BLIP's ITC / ITM read the CLS token: keep it (adapters drop prefix tokens by default).
    return HFVisionAdapter(BlipVisionModel(BlipVisionConfig(**vision_config)), prefix_tokens="keep")


class BLIP(nn.Module):
    """BLIP: image encoder + MED text transformer + ITC projections + ITM head + LM head.

    Args:
        visual_encoder: images ``[B, C, H, W]`` -> tokens ``[B, S, width]`` (first token = CLS):
            :class:`vlmcore.VisionTransformer`, an adapter, or :func:`blip_vision_encoder`.
        text_config: :class:`MEDConfig`; ``encoder_width`` must equal the image token width.
        embed_dim: ITC feature width (256 in BLIP).

        momentum: EMA coefficient of the momentum encoders (BLIP: 0.995); ``None`` builds no momentum
            encoders and no queues (captioning, inference), and :meth:`forward` then needs
            ``losses`` without ``"itc"``.
        queue_size: momentum features kept per modality (BLIP: 57,600); 0 = no queue.
        temperature: initial ITC temperature (BLIP: 0.07); clamped to [0.001, 0.5] at every forward.
    """

    def __init__(self, visual_encoder: nn.Module, text_config: MEDConfig, *, embed_dim: int = 256,
                 momentum: float | None = 0.995, queue_size: int = 57600, temperature: float = 0.07):
        super().__init__()
        if not isinstance(text_config, MEDConfig):
            raise TypeError(f"text_config must be a MEDConfig, got {type(text_config).__name__}")
        check_positive_int("embed_dim", embed_dim)
        width = vision_width(visual_encoder)
        if width != text_config.encoder_width:
            raise ValueError(f"text_config.encoder_width ({text_config.encoder_width}) must equal the visual "
                             f"encoder's token width ({width})")
        self.config = text_config
        self.embed_dim = embed_dim
        self.visual_encoder = visual_encoder
        self.text_encoder = MEDTextModel(text_config)
        self.lm_head = LMHead(text_config)
        if text_config.tie_word_embeddings:
            self.lm_head.predictions.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text_config.hidden_size, 2)
        if not 0.001 <= float(temperature) <= 0.5:
            raise ValueError(f"temperature must be in [0.001, 0.5], got {temperature!r}")
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.momentum = momentum
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
                raise ValueError(f"momentum must be a float in [0, 1) or None, got {momentum!r}")
            if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
                raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
            self.visual_encoder_m = _frozen_copy(visual_encoder)
            self.vision_proj_m = _frozen_copy(self.vision_proj)
            self.text_encoder_m = _frozen_copy(self.text_encoder)
            self.text_proj_m = _frozen_copy(self.text_proj)
            self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
            # image ids of the queued entries (BLIP retrieval's idx_queue); -100 matches no sample
            self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # -- the three text modes and the heads ------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens ``[B, S, width]`` (CLS first)."""
        return self.visual_encoder(images)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ITC image features: ``normalize(vision_proj(CLS))``, ``[B, embed_dim]``."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITC text features from the unimodal encoder: ``normalize(text_proj(first token))``, ``[B, embed_dim]``.
        ``input_ids`` are used as given (BLIP: ``[CLS]`` first)."""
        hidden = self.text_encoder(input_ids, attention_mask, mode="text")
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                   *, replace_first_token: bool = True) -> torch.Tensor:
        """ITM logits ``[B, 2]`` (index 1 = match) of the image-grounded encoder's first token.

        With ``replace_first_token`` the first id becomes ``[ENC]`` (BLIP); HF's
        ``BlipForImageTextRetrieval`` uses the ids as given (``replace_first_token=False``).
        """
        if replace_first_token:
            input_ids = with_first_token(input_ids, self.config.enc_token_id)
        hidden = self.text_encoder(input_ids, attention_mask, mode="multimodal", image_embeds=image_embeds,
                                   image_mask=image_mask)
        return self.itm_head(hidden[:, 0])

    def itm_match_probability(self, images: torch.Tensor, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``softmax(ITM logits)[:, 1]``, ``[B]``: the probability that caption i matches image i (CapFilt's filter)."""
        return self.itm_logits(self.encode_image(images), input_ids, attention_mask).float().softmax(-1)[:, 1]

    def decoder_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Next-token logits ``[B, L, vocab]`` of the image-grounded decoder (ids used as given)."""
        hidden = self.text_encoder(input_ids, attention_mask, mode="decoder", image_embeds=image_embeds,
                                   image_mask=image_mask)
        return self.lm_head(hidden)

    def lm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, prompt_length: int = 0, label_smoothing: float = 0.1, image_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """BLIP's captioning loss, an fp32 scalar.

        The first id becomes ``[DEC]``; targets are the ids shifted by one, with padding and the
        first ``prompt_length`` positions (BOS + the prompt's tokens, e.g. "a picture of ")
        excluded; cross-entropy with ``label_smoothing`` (0.1 in BLIP), mean over target tokens.
        """
        check_token_ids("input_ids", input_ids)
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"prompt_length must be an int >= 0, got {prompt_length!r}")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        decoder_ids = with_first_token(input_ids, self.config.bos_token_id)
        labels = decoder_ids.masked_fill(decoder_ids == self.config.pad_token_id, -100)
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        labels[:, :prompt_length] = -100
        logits = self.decoder_logits(image_embeds, decoder_ids, attention_mask, image_mask)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=float(label_smoothing))

    def itc_similarity(self, images: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities ``[B_images, B_texts]`` of the ITC features (HF ``use_itm_head=False``)."""
        return self.image_features(self.encode_image(images)) @ self.text_features(input_ids, attention_mask).T

    # -- momentum encoders, queues, pre-training losses -------------------------------------

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, momentum)`` module pairs, in one fixed order."""
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def _require_momentum(self, what: str) -> None:
        """Raise ``ValueError`` naming ``what`` when this BLIP was built without momentum encoders."""
        if self.momentum is None:
            raise ValueError(f"{what} needs the momentum encoders: build BLIP with momentum=<float> (not None)")

    @torch.no_grad()
    def copy_params_to_momentum(self) -> None:
        """Momentum encoders := online encoders (BLIP does this at init and after loading weights)."""
        self._require_momentum("copy_params_to_momentum")
        for online, momentum in self._momentum_pairs():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_m = m theta_m + (1 - m) theta`` for every momentum parameter (one fused foreach op)."""
        self._require_momentum("momentum_update")
        online, momentum = [], []
        for a, b in self._momentum_pairs():
            online.extend(a.parameters())
            momentum.extend(b.parameters())
        torch._foreach_mul_(momentum, self.momentum)
        torch._foreach_add_(momentum, online, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def momentum_features(self, images: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC features of the momentum encoders, ``([B, embed_dim], [B, embed_dim])``, no gradient."""
        self._require_momentum("momentum_features")
        image_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
        text_m = F.normalize(self.text_proj_m(self.text_encoder_m(input_ids, attention_mask, mode="text")[:, 0]),
                             dim=-1)
        return image_m, text_m

    @torch.no_grad()
    def enqueue(self, image_features_m: torch.Tensor, text_features_m: torch.Tensor, group=None,
                image_ids: torch.Tensor | None = None) -> None:
        """Write the momentum features of this step and their ``image_ids`` ``[B]`` (-100 when None:
        matches no later sample) into the queues at ``queue_ptr``, gathered from every rank of
        ``group`` when given (rank order), wrapping around; no host sync."""
        self._require_momentum("enqueue")
        queue_size = self.image_queue.shape[0]
        if queue_size == 0:
            return
        if image_ids is None:
            image_ids = torch.full((image_features_m.shape[0],), -100, dtype=torch.long,
                                   device=image_features_m.device)
        if group is not None:
            image_features_m = all_gather_no_grad(image_features_m, group)
            text_features_m = all_gather_no_grad(text_features_m, group)
            image_ids = all_gather_no_grad(image_ids, group)
        n = image_features_m.shape[0]
        if n > queue_size:
            raise ValueError(f"queue_size ({queue_size}) must be >= the global batch ({n}) that is enqueued per step")
        slots = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % queue_size
        self.image_queue.index_copy_(0, slots, image_features_m.to(self.image_queue.dtype))
        self.text_queue.index_copy_(0, slots, text_features_m.to(self.text_queue.dtype))
        self.idx_queue.index_copy_(0, slots, image_ids.to(self.idx_queue.device, torch.long))
        self.queue_ptr.copy_((self.queue_ptr + n) % queue_size)

    def itc_loss(self, image_features: torch.Tensor, text_features: torch.Tensor, image_features_m: torch.Tensor,
                 text_features_m: torch.Tensor, alpha: float, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """BLIP's ITC with momentum distillation against [momentum batch; queue], through the fused
        :func:`vlmcore.kernels.momentum_contrastive_loss` (fp32 scalar). With ``image_ids`` ``[B]``
        every batch or queue entry of the same image is a positive (BLIP ``blip_retrieval.py``);
        with unique ids this is exactly the one-hot target of BLIP pre-training."""
        self._require_momentum("itc_loss")
        queued = self.image_queue.shape[0] > 0
        return momentum_contrastive_loss(
            image_features, text_features, image_features_m, text_features_m, self.temp, alpha,
            image_queue=self.image_queue.to(image_features.dtype) if queued else None,
            text_queue=self.text_queue.to(text_features.dtype) if queued else None,
            ids=image_ids, queue_ids=self.idx_queue if queued and image_ids is not None else None)

    def itm_loss(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_features: torch.Tensor, text_features: torch.Tensor, *, image_ids: torch.Tensor | None = None,
                 negatives_group=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss with one hard negative per row in each direction (BLIP).

        Negatives are drawn from ``softmax(ITC similarity / temp)`` by :func:`sample_hard_negatives`,
        never a positive: the diagonal, or with ``image_ids`` every pair of the same image. With
        ``negatives_group`` (retrieval fine-tuning, ``blip_retrieval.py``), the candidates are the
        whole batch of every rank: features, ids, masks and image ids are all-gathered, image tokens
        with a differentiable all-gather. Rows without any negative count 0. Returns ``(loss fp32
        scalar, accuracy of the 3B ITM decisions)``.
        """
        b = image_embeds.shape[0]
        offset = 0
        all_embeds, all_ids, all_mask = image_embeds, input_ids, attention_mask
        all_image_feat, all_text_feat, all_image_ids = image_features, text_features, image_ids
        if negatives_group is not None:
            offset = rank_and_world(negatives_group)[0] * b
            all_embeds = all_gather_with_grad(image_embeds.reshape(b, -1), negatives_group).view(
                -1, *image_embeds.shape[1:])
            all_ids = all_gather_no_grad(input_ids, negatives_group)
            all_mask = all_gather_no_grad(attention_mask, negatives_group)
            all_image_feat = all_gather_no_grad(image_features.detach(), negatives_group)
            all_text_feat = all_gather_no_grad(text_features.detach(), negatives_group)
            if image_ids is not None:
                all_image_ids = all_gather_no_grad(image_ids, negatives_group)
        with torch.no_grad():
            temp = self.temp.float()
            sim_i2t = (image_features @ all_text_feat.T).float() / temp  # [b, world b]
            sim_t2i = (text_features @ all_image_feat.T).float() / temp
            if image_ids is None:
                columns = torch.arange(all_ids.shape[0], device=image_embeds.device)
                positive = columns[None, :] == (torch.arange(b, device=image_embeds.device) + offset)[:, None]
            else:
                positive = image_ids[:, None] == all_image_ids[None, :]
            neg_text, text_ok = sample_hard_negatives(sim_i2t, positive, generator=generator)
            neg_image, image_ok = sample_hard_negatives(sim_t2i, positive, generator=generator)
        ids_cat = torch.cat([input_ids, input_ids, all_ids[neg_text]])
        mask_cat = torch.cat([attention_mask, attention_mask, all_mask[neg_text]])
        embeds_cat = torch.cat([image_embeds, all_embeds[neg_image], image_embeds])
        logits = self.itm_logits(embeds_cat, ids_cat, mask_cat).float()
        labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * b, dtype=torch.long, device=logits.device)])
        weight = torch.cat([torch.ones_like(image_ok), image_ok, text_ok]).float()
        per_row = F.cross_entropy(logits, labels, reduction="none")
        loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
        accuracy = (((logits.argmax(1) == labels).float() * weight).sum() / weight.sum().clamp_min(1.0)).detach()
        return loss, accuracy

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                alpha: float = 0.4, losses: tuple[str, ...] = ("itc", "itm", "lm"), prompt_length: int = 0,
                image_ids: torch.Tensor | None = None, group=None, all_rank_negatives: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One BLIP training step's losses (``blip_pretrain.py``): ``{"loss", "itc", "itm", "lm", "itm_acc"}``
        for the requested ``losses``; ``loss`` is their sum.

        ``input_ids`` ``[B, L]`` start with ``[CLS]`` (the ITC text encoder reads them as given; ITM
        swaps in ``[ENC]``, LM ``[DEC]``). ``alpha``: distillation weight (see :func:`alpha_ramp`).
        ITC clamps the temperature to [0.001, 0.5], updates the momentum encoders, scores against
        the queues, then enqueues the momentum features (of every rank of ``group``).
        ``image_ids`` ``[B]`` (int64) makes same-image pairs ITC positives (batch and queue) and masks
        them out of the ITM negatives; ``all_rank_negatives`` draws
        them from every rank of ``group`` (retrieval fine-tuning) instead of the local batch
        (pre-training). ``prompt_length`` excludes the prompt from the LM loss.
        """
        unknown = set(losses) - {"itc", "itm", "lm"}
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of ('itc', 'itm', 'lm'), got {losses!r}")
        check_token_ids("input_ids", input_ids)
        if all_rank_negatives and group is None:
            raise ValueError("all_rank_negatives=True needs group (the data-parallel process group)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out: dict[str, torch.Tensor] = {}
        image_embeds = self.encode_image(images)
        if "itc" in losses or "itm" in losses:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            image_feat = self.image_features(image_embeds)
            text_feat = self.text_features(input_ids, attention_mask)
        if "itc" in losses:
            self._require_momentum("the ITC loss")
            with torch.no_grad():
                self.momentum_update()
                image_feat_m, text_feat_m = self.momentum_features(images, input_ids, attention_mask)
            out["itc"] = self.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, alpha, image_ids)
            self.enqueue(image_feat_m, text_feat_m, group, image_ids)
        if "itm" in losses:
            out["itm"], out["itm_acc"] = self.itm_loss(image_embeds, input_ids, attention_mask, image_feat,
                                                       text_feat, image_ids=image_ids, generator=generator,
                                                       negatives_group=group if all_rank_negatives else None)
        if "lm" in losses:
            out["lm"] = self.lm_loss(image_embeds, input_ids, attention_mask, prompt_length=prompt_length)
        out["loss"] = sum(out[name] for name in ("itc", "itm", "lm") if name in out)
        return out

    @torch.no_grad()
    def retrieval_scores(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         *, k_test: int = 256, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP's retrieval scores: ITC similarity, with each query's top ``k_test`` candidates
        re-ranked by ``ITM logit(match) + ITC similarity`` (BLIP ``evaluation``); others get -100.

        Returns ``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`` (fp32).
        """
        check_positive_int("batch_size", batch_size)
        embeds = torch.cat([self.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        return self.rerank_scores(self.image_features(embeds), embeds, input_ids, attention_mask, k_test=k_test,
                                  batch_size=batch_size)

    @torch.no_grad()
    def rerank_scores(self, image_feat: torch.Tensor, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None, *, image_mask: torch.Tensor | None = None,
                      k_test: int = 256, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The scores of :meth:`retrieval_scores` from visual inputs already encoded (images, or videos'
        frame tokens: :mod:`vlmcore.blip.video`).

        Args:
            image_feat: ``[N_img, embed_dim]`` normalized ITC features.
            image_embeds: ``[N_img, S, width]`` the tokens the ITM cross-attends to; they may live on
                another device than the text (e.g. the CPU): each query's candidates are moved over.
            input_ids, attention_mask: ``[N_txt, L]`` captions (``[CLS]`` first; ITM puts ``[ENC]``).
            image_mask: bool ``[N_img, S]`` (False = padding token, kept out of the ITM keys) or None.

        Returns ``(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])`` (fp32).
        """
        check_positive_int("k_test", k_test)
        check_positive_int("batch_size", batch_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device
        text_feat = torch.cat([self.text_features(input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                               for i in range(0, len(input_ids), batch_size)])
        sim = (image_feat.to(text_feat) @ text_feat.T).float()

        def rerank(similarity: torch.Tensor, image_of, text_of) -> torch.Tensor:
            scores = torch.full_like(similarity, -100.0)
            k = min(k_test, similarity.shape[1])
            top_sim, top_idx = similarity.topk(k, dim=1)
            for row in range(similarity.shape[0]):
                img, txt = image_of(row, top_idx[row]), text_of(row, top_idx[row])
                tokens = image_embeds[img.to(image_embeds.device)].to(device)
                tokens_mask = None if image_mask is None else image_mask[img.to(image_mask.device)].to(device)
                itm = self.itm_logits(tokens, input_ids[txt], attention_mask[txt], tokens_mask)[:, 1].float()
                scores[row, top_idx[row]] = itm + top_sim[row]
            return scores

        score_i2t = rerank(sim, lambda row, idx: torch.full_like(idx, row), lambda row, idx: idx)
        score_t2i = rerank(sim.T, lambda row, idx: idx, lambda row, idx: torch.full_like(idx, row))
        return score_i2t, score_t2i

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: list[int] | None = None, *, num_beams: int = 3,
                 do_sample: bool = False, top_p: float = 0.9, max_length: int = 30, min_length: int = 10,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, use_cache: bool = True,
                 **generate_kwargs) -> torch.Tensor:
        """Captions for ``images`` ``[B, C, H, W]``, as BLIP generates them.

        The decoder input is ``[DEC] + prompt_ids`` (BLIP: the tokens of "a picture of " without
        ``[CLS]`` / ``[SEP]``); decoding stops at ``[SEP]``, pads with the pad id. Beam search by
        default (BLIP: 3 beams, max 30, min 10 tokens); ``do_sample=True`` is nucleus sampling with
        ``top_p`` (BLIP: 0.9, ``repetition_penalty=1.1``). ``max_length`` / ``min_length`` count the
        whole sequence, prompt included (as Hugging Face and BLIP do). Runs Hugging Face's
        ``GenerationMixin.generate`` over this model's decoder; extra keyword arguments go there.
        ``use_cache`` (default) decodes with a :class:`vlmcore.blip.text.DecoderCache`: each step runs
        only the new token, the image keys / values are projected once; ``use_cache=False`` re-runs
        the whole caption every step (the reference the cached path is tested and benchmarked against).

        Returns:
            ``[B * num_return_sequences, T]`` token ids after the prompt (the caption; BLIP strips
            the prompt the same way), padded with ``pad_token_id``.
        """
        prompt_ids = [] if prompt_ids is None else [int(t) for t in prompt_ids]
        if any(not 0 <= t < self.config.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {self.config.vocab_size}), got {prompt_ids}")
        check_positive_int("max_length", max_length)
        if max_length <= 1 + len(prompt_ids):
            raise ValueError(f"max_length ({max_length}) must exceed 1 + len(prompt_ids) ({1 + len(prompt_ids)})")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        image_embeds = self.encode_image(images)
        b = image_embeds.shape[0]
        input_ids = torch.tensor([[self.config.bos_token_id, *prompt_ids]], device=image_embeds.device).repeat(b, 1)
        wrapper = _decoder_for_generation_class()(self)
        sampling = dict(do_sample=True, top_p=float(top_p), num_beams=1) if do_sample else dict(
            do_sample=False, num_beams=int(num_beams))
        cache = dict(cache=DecoderCache(), use_cache=True) if use_cache else dict(use_cache=False)
        out = wrapper.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=image_embeds,
            max_length=int(max_length), min_length=int(min_length), repetition_penalty=float(repetition_penalty),
            num_return_sequences=int(num_return_sequences), eos_token_id=self.config.sep_token_id,
            pad_token_id=self.config.pad_token_id, bos_token_id=self.config.bos_token_id,
            **cache, **sampling, **generate_kwargs,
        )
        return out[:, input_ids.shape[1]:]

    # -- weights by name (the conversions live in vlmcore.blip.convert) -------------------------

    def load_hf_retrieval_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """:func:`vlmcore.blip.convert.load_hf_retrieval_state_dict` (``BlipForImageTextRetrieval``)."""
        return convert.load_hf_retrieval_state_dict(self, state_dict)

    def load_hf_captioning_state_dict(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """:func:`vlmcore.blip.convert.load_hf_captioning_state_dict` (``BlipForConditionalGeneration``)."""
        return convert.load_hf_captioning_state_dict(self, state_dict)

    def load_salesforce_state_dict(self, state_dict: dict[str, torch.Tensor], *, load_momentum: bool = True,
                                   interpolate_pos_embed: bool = False) -> list[str]:
        """:func:`vlmcore.blip.convert.load_salesforce_state_dict` (a salesforce/BLIP ``.pth`` state dict)."""
        return convert.load_salesforce_state_dict(self, state_dict, load_momentum=load_momentum,
                                                  interpolate_pos_embed=interpolate_pos_embed)

    def load_salesforce_checkpoint(self, path: str, **kwargs) -> list[str]:
        """:func:`vlmcore.blip.convert.load_salesforce_checkpoint` (a salesforce/BLIP ``.pth`` file)."""
        return convert.load_salesforce_checkpoint(self, path, **kwargs)


def blip_retrieval_metrics(score_i2t: torch.Tensor, score_t2i: torch.Tensor,
                           text_to_image: torch.Tensor | None = None, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k of :meth:`BLIP.retrieval_scores` (i2t from ``score_i2t`` ``[N_img, N_txt]``, t2i from
    ``score_t2i`` ``[N_txt, N_img]``), by :func:`vlmcore.retrieval.recall_at_k` (several captions per
    image via ``text_to_image``; ties rank pessimistically), plus ``"mean_recall"``."""
    n_img, n_txt = score_i2t.shape
    if tuple(score_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"score_t2i must be [N_txt, N_img] = {(n_txt, n_img)}, got {tuple(score_t2i.shape)}")
    return with_mean_recall(recall_at_k(score_i2t, score_t2i, text_to_image, ks))


def alpha_ramp(step: int, ramp_steps: int, alpha: float = 0.4) -> float:
    """BLIP's distillation weight schedule: ``alpha * min(1, step / ramp_steps)`` (BLIP ramps over the
    first epoch's steps, then keeps ``alpha``)."""
    check_positive_int("ramp_steps", ramp_steps)
    return float(alpha) * min(1.0, max(0, step) / ramp_steps)


# BLIP adds this to every softmax weight before drawing (blip_pretrain.py: ``softmax(sim) + 1e-4``).
_HARD_NEGATIVE_WEIGHT_FLOOR = 1e-4


def sample_hard_negatives(similarity: torch.Tensor, positive_mask: torch.Tensor, *,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's ITM negatives: :func:`vlmcore.hard_negatives.sample_hard_negatives` with weights
    ``softmax(similarity) + 1e-4`` over the non-positive columns of ``similarity`` ``[b, N]``
    (``positive_mask`` bool ``[b, N]``). Returns ``(index long [b], valid bool [b])``; no host sync."""
    return hard_negatives.sample_hard_negatives(similarity, positive_mask, generator=generator,
                                                weight_floor=_HARD_NEGATIVE_WEIGHT_FLOOR)


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` (a momentum encoder's initial state)."""
    copied = copy.deepcopy(module)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


@functools.cache
def _decoder_for_generation_class():
    """:class:`DecoderForGeneration`, built once on first use (transformers is imported lazily)."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class DecoderForGeneration(PreTrainedModel, GenerationMixin):
        """BLIP's image-grounded decoder behind Hugging Face's ``GenerationMixin`` (beam search,
        sampling, logits processors), so that no second beam search exists here. Built per
        :meth:`BLIP.generate` call around the model's own modules (no copy). With a ``cache``
        (:class:`DecoderCache`, passed to ``generate``) each step feeds only the tokens the cache
        has not seen; beam search reorders it through ``DecoderCache.reorder_cache``. Without one
        each step re-runs the whole caption."""

        main_input_name = "input_ids"

        def __init__(self, model: BLIP):
            config = PretrainedConfig(vocab_size=model.config.vocab_size, bos_token_id=model.config.bos_token_id,
                                      eos_token_id=model.config.sep_token_id, pad_token_id=model.config.pad_token_id)
            super().__init__(config)
            self.text_encoder = model.text_encoder
            self.lm_head = model.lm_head

        def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, cache=None, **_):
            hidden = self.text_encoder(input_ids, attention_mask, mode="decoder", image_embeds=encoder_hidden_states,
                                       cache=cache)
            return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=cache)

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, encoder_hidden_states=None,
                                          cache=None, **_):
            if cache is not None:
                input_ids = input_ids[:, cache.get_seq_length():]
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "encoder_hidden_states": encoder_hidden_states, "cache": cache}

    return DecoderForGeneration

