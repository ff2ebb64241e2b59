"""BLIP-2 (Li et al. 2023) stage 1: representation learning of the Q-Former (ITC, ITM, ITG).

Semantics of LAVIS ``blip2_models/blip2_qformer.py``, with these differences, all on purpose:

- ITM hard negatives are drawn on the device with the Gumbel-max trick
  (:mod:`vlmcore.hard_negatives`): exactly one draw from the softmax of the ITC similarities over
  the non-positive candidates, with no host sync (LAVIS loops over rows with
  ``torch.multinomial(...).item()``). A positive can never be drawn; a row whose candidates
  are all positives (possible with ``image_ids``) gets weight 0 in the ITM loss instead.
- Across ranks only the chosen negatives move (:func:`fetch_rows`: the ``[world, b]`` indices are
  all-gathered, then one ``all_to_all`` of exactly the requested rows), never an all-gather of every
  rank's image tokens. At LAVIS's stage-1 shapes (b = 100 per rank, 257 x 1408 tokens, bf16) an
  all-gather brings each rank ``(world - 1) x 72.4 MB`` (1.09 GB at 16 ranks); the exchange brings at
  most ``b`` rows = 72.4 MB whatever the world size, and on average ``(world - 1) / world`` of that.
  The exchanged negatives carry no gradient (they come from the frozen image tower; LAVIS gathers
  them with gradient because its ``ln_vision`` trains, which is not done here).
- The ITC columns (every rank's features) are gathered without gradient by default
  (``gather_with_grad=False``, LAVIS's ``concat_all_gather``; the local rows keep theirs), also in a
  one-process run, so 1 and N ranks compute the same thing (LAVIS without torch.distributed returns
  the features themselves, which is ``gather_with_grad=True``). ``gather_with_grad=True``:
  :func:`vlmcore.kernels.all_gather_with_grad` (the gradients of every rank's columns flow back).
- With a ``generator``, the Gumbel noise of all ``N x N`` (row, candidate) pairs is drawn on every
  rank and each keeps its rows: the same seed picks the same negatives on 1 or N ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import vlmcore.blip2.convert as convert
import vlmcore.hard_negatives as hard_negatives
from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.blip2.qformer import QFormer
from vlmcore.distributed import gather_rows, rank_and_world

# ---------------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------------


def fetch_rows(local: torch.Tensor, index: torch.Tensor, group) -> torch.Tensor:
    """Rows ``index`` ``[b]`` of the rank-major concatenation of every rank's ``local`` ``[b, ...]``
    (global row j lives on rank ``j // b``), moving only the requested rows. Detached.

    One process: ``local[index]``, no host sync. Several: the ``[world, b]`` indices are
    all-gathered, then one ``all_to_all_single`` sends each rank exactly the rows it asked for; its
    split sizes are host integers, so this path reads a ``[world]`` count vector on the host (one
    small sync, which NCCL's all-to-all requires). Every rank's ``local`` must have the same shape.
    """
    rank, world = rank_and_world(group)
    local = local.detach()
    if world == 1:
        return local.index_select(0, index)
    rows = local.shape[0]
    all_index = torch.empty(world, rows, dtype=index.dtype, device=index.device)
    dist.all_gather(list(all_index.unbind(0)), index.contiguous(), group=group)
    owner = all_index // rows  # [world, b]
    mine = owner == rank
    send = local.index_select(0, (all_index - rank * rows)[mine])  # requester-major, request order
    send_counts = mine.sum(dim=1).tolist()
    my_owner = owner[rank]
    order = torch.sort(my_owner, stable=True).indices  # my requests grouped by owner rank
    recv_counts = torch.bincount(my_owner, minlength=world).tolist()
    received = torch.empty_like(local)
    dist.all_to_all_single(received, send.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    out = torch.empty_like(received)
    out[order] = received
    return out


def sample_hard_negatives(logits: torch.Tensor, positive: torch.Tensor, noise: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's ITM negatives (LAVIS: ``softmax(sim)``, no floor): one candidate per row of ``logits``
    ``[b, N]`` (already divided by the temperature) over the columns where ``positive`` ``[b, N]`` is
    False, by :func:`vlmcore.hard_negatives.sample_hard_negatives` with the uniform draws ``noise``
    ``[b, N]``. Returns ``(index [b] int64, valid [b] bool)``; no host sync."""
    return hard_negatives.sample_hard_negatives(logits, positive, noise=noise, weight_floor=0.0)


def soft_target_cross_entropy(logits: torch.Tensor, positive: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean over rows of ``-sum_j t_ij log softmax(logits)_ij`` with ``t = (1 - eps) pos / |pos| + eps / N``.

    With one positive per row this is ``F.cross_entropy(..., label_smoothing=eps)``; with several
    (equal ``image_ids``) it is LAVIS's retrieval-finetuning target.
    """
    pos = positive.float()
    targets = (1.0 - label_smoothing) * pos / pos.sum(dim=1, keepdim=True) + label_smoothing / logits.shape[1]
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------------


class Blip2Stage1(nn.Module):
    """BLIP-2 stage 1: the Q-Former learns ITC, ITM (hard negatives) and ITG on a frozen image tower.

    Args:
        qformer: the :class:`QFormer` (trainable).
        vision_encoder: optional frozen module ``images -> [B, S, vision_width]`` (kept in eval mode,
            run under ``no_grad``); without one, :meth:`forward` takes ``image_embeds``.
        embed_dim: ITC projection width (256).
        dec_token_id: the ``[DEC]`` token that replaces the first text token (``[CLS]``) for ITG.
        init_temperature: ITC temperature (0.07), learnable, clamped to [0.001, 0.5] as in LAVIS.
        label_smoothing: of ITC and ITG (0.1).
        group: data-parallel process group for ITC / ITM (None: one process).
        gather_with_grad: see the module docstring.

    Parameter names: ``qformer.*``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, and the ITG
    head ``lm_head_dense``, ``lm_head_norm``, ``lm_head_bias`` (its output matrix is tied to
    ``qformer.word_embeddings``, as LAVIS's BertLMHeadModel ties ``cls.predictions.decoder``).
    """

    def __init__(self, qformer: QFormer, vision_encoder: nn.Module | None = None, *, embed_dim: int = 256,
                 dec_token_id: int, init_temperature: float = 0.07, label_smoothing: float = 0.1, group=None,
                 gather_with_grad: bool = False):
        super().__init__()
        if not isinstance(qformer, QFormer):
            raise TypeError(f"qformer must be a vlmcore.QFormer, got {type(qformer).__name__}")
        check_positive_int("embed_dim", embed_dim)
        if not 0 <= int(dec_token_id) < qformer.vocab_size:
            raise ValueError(f"dec_token_id must be a token id in [0, {qformer.vocab_size}), got {dec_token_id!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        hidden = qformer.hidden_size
        self.qformer = qformer
        self.vision_encoder = None if vision_encoder is None else vision_encoder.requires_grad_(False).eval()
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(float(init_temperature)))
        self.lm_head_dense = nn.Linear(hidden, hidden)
        self.lm_head_norm = nn.LayerNorm(hidden, eps=qformer.embed_norm.eps)
        self.lm_head_bias = nn.Parameter(torch.zeros(qformer.vocab_size))
        self.dec_token_id = int(dec_token_id)
        self.label_smoothing = float(label_smoothing)
        self.group = group
        self.gather_with_grad = bool(gather_with_grad)

    def train(self, mode: bool = True):
        """Set the mode; the frozen vision encoder always stays in eval mode."""
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()
        return self

    # ----------------------------------------------------------------------------- features

    def image_embeddings(self, images: torch.Tensor | None, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Frozen image tokens ``[B, S, vision_width]``: ``image_embeds``, or ``vision_encoder(images)`` (no grad)."""
        if (images is None) == (image_embeds is None):
            raise ValueError("pass exactly one of images and image_embeds")
        if images is None:
            return image_embeds
        if self.vision_encoder is None:
            raise ValueError("images were given but this model has no vision_encoder; pass image_embeds")
        with torch.no_grad():
            return self.vision_encoder(images)

    def image_features(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized ``vision_proj(query outputs)`` ``[B, Q, embed_dim]``."""
        return F.normalize(self.vision_proj(self.qformer.encode_image(image_embeds, image_mask)), dim=-1)

    def text_features(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized ``text_proj([CLS] output)`` ``[B, embed_dim]``."""
        return F.normalize(self.text_proj(self.qformer.encode_text(text_ids, attention_mask)[:, 0]), dim=-1)

    @staticmethod
    def similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """ITC similarity ``[N_img, N_txt]``: the max over the queries of query . text (no temperature)."""
        return torch.einsum("iqe,te->itq", image_features, text_features).amax(dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITM ``[B, 2]`` logits (1 = match): ``itm_head`` on the mean of the query outputs of a
        bidirectional queries + text pass."""
        out = self.qformer(image_embeds, text_ids, attention_mask, image_mask=image_mask, mode="bidirectional")
        return self.itm_head(out[:, : self.qformer.num_query_tokens].mean(dim=1))

    def itg_logits(self, text_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   query_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """ITG ``[B, L, vocab]`` next-token logits of ``text_ids`` (first token replaced by ``[DEC]``)."""
        decoder_ids = text_ids.clone()
        decoder_ids[:, 0] = self.dec_token_id
        hidden = self.qformer.decode_text(decoder_ids, attention_mask, query_kv)
        hidden = self.lm_head_norm(F.gelu(self.lm_head_dense(hidden)))
        return F.linear(hidden, self.qformer.word_embeddings.weight, self.lm_head_bias)

    # ----------------------------------------------------------------------------- forward

    def _noise(self, rows: int, total: int, rank: int, device: torch.device, generator) -> torch.Tensor:
        """Uniform draws ``[rows, total]`` for this rank's rows; with ``generator`` the ``[total, total]``
        draws of every rank are made and this rank keeps its slice (1 and N ranks draw the same)."""
        if generator is None:
            return torch.rand(rows, total, device=device)
        full = torch.rand(total, total, generator=generator, device=generator.device)
        return full[rank * rows:(rank + 1) * rows].to(device)

    def forward(self, images: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, image_embeds: torch.Tensor | None = None,
                image_ids: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, group=None) -> dict[str, torch.Tensor]:
        """The three stage-1 losses on a batch of ``b`` pairs (this rank's part of the global batch).

        Args:
            images / image_embeds: images for ``vision_encoder``, or the frozen tokens ``[b, S, W]``.
            text_ids: ``[b, L]`` with ``[CLS]`` first; attention_mask ``[b, L]`` (1 = token).
            image_ids: optional ``[b]`` ints; equal ids are positives (several captions per image).
            image_mask: optional ``[b, S]`` bool, False = padding image token.
            generator: optional RNG of the hard-negative draws (see the module docstring).
            group: the data-parallel group of this call (default: the one given at construction).

        Returns:
            ``{"loss": itc + itm + itg, "loss_itc", "loss_itm", "loss_itg", "itc_i2t_acc",
            "itc_t2i_acc", "itm_acc"}`` (fp32 scalars; accuracies detached). No host sync in one
            process; several ranks sync once in :func:`fetch_rows`.
        """
        if text_ids is None:
            raise ValueError("text_ids is required")
        check_token_ids("text_ids", text_ids)
        image_embeds = self.image_embeddings(images, image_embeds)
        batch = text_ids.shape[0]
        _check_batch(image_embeds, image_ids, batch)
        if attention_mask is None:
            attention_mask = torch.ones_like(text_ids)
        group = self.group if group is None else group
        rank, _ = rank_and_world(group)
        device = text_ids.device
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        # ITC: queries alone (keeping their keys/values for ITG) and text alone.
        query_out, query_kv = self.qformer.encode_image(image_embeds, image_mask, return_kv=True)
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)  # [b, Q, e]
        text_feat = self.text_features(text_ids, attention_mask)  # [b, e]
        image_feats_all = gather_rows(image_feats, group, with_grad=self.gather_with_grad)  # [N, Q, e]
        text_feat_all = gather_rows(text_feat, group, with_grad=self.gather_with_grad)  # [N, e]
        total = image_feats_all.shape[0]
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_feat_all).amax(dim=-1) / self.temp  # [b, N]
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_feats_all).amax(dim=-1) / self.temp  # [b, N]
        if image_ids is None:
            columns = torch.arange(total, device=device)
            positive = columns[None, :] == (rank * batch + torch.arange(batch, device=device))[:, None]
        else:
            ids_all = gather_rows(image_ids, group, with_grad=False)
            positive = image_ids[:, None] == ids_all[None, :]  # [b, N]
        loss_itc = 0.5 * (soft_target_cross_entropy(sim_i2t, positive, self.label_smoothing)
                          + soft_target_cross_entropy(sim_t2i, positive, self.label_smoothing))
        i2t_acc = positive.gather(1, sim_i2t.argmax(dim=1, keepdim=True)).float().mean()
        t2i_acc = positive.gather(1, sim_t2i.argmax(dim=1, keepdim=True)).float().mean()

        loss_itm, itm_acc = self._itm_loss(image_embeds, image_mask, text_ids, attention_mask, sim_i2t, sim_t2i,
                                           positive, group, generator)
        loss_itg = self._itg_loss(text_ids, attention_mask, query_kv)
        return {
            "loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm,
            "loss_itg": loss_itg, "itc_i2t_acc": i2t_acc.detach(), "itc_t2i_acc": t2i_acc.detach(),
            "itm_acc": itm_acc.detach(),
        }

    def _itm_loss(self, image_embeds, image_mask, text_ids, attention_mask, sim_i2t, sim_t2i, positive, group,
                  generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM on ``3b`` pairs: the ``b`` positives, for each text a hard negative image, for each image a
        hard negative text (drawn from ``sim_t2i`` / ``sim_i2t`` ``[b, N]``, never where ``positive``).
        Returns ``(loss, accuracy)``; rows without a negative weigh 0."""
        batch, device = text_ids.shape[0], text_ids.device
        rank, _ = rank_and_world(group)
        total = sim_i2t.shape[1]
        noise_t2i = self._noise(batch, total, rank, device, generator)
        noise_i2t = self._noise(batch, total, rank, device, generator)
        neg_image, valid_t2i = sample_hard_negatives(sim_t2i, positive, noise_t2i)
        neg_text, valid_i2t = sample_hard_negatives(sim_i2t, positive, noise_i2t)
        image_neg = fetch_rows(image_embeds, neg_image, group)
        text_neg = fetch_rows(text_ids, neg_text, group)
        mask_neg = fetch_rows(attention_mask, neg_text, group)
        itm_images = torch.cat([image_embeds, image_neg, image_embeds], dim=0)  # pos, neg image, pos image
        itm_text = torch.cat([text_ids, text_ids, text_neg], dim=0)  # pos, pos text, neg text
        itm_mask = torch.cat([attention_mask, attention_mask, mask_neg.to(attention_mask.dtype)], dim=0)
        itm_image_mask = None
        if image_mask is not None:
            image_mask_neg = fetch_rows(image_mask.to(torch.uint8), neg_image, group).bool()
            itm_image_mask = torch.cat([image_mask, image_mask_neg, image_mask], dim=0)
        itm_logits = self.itm_logits(itm_images, itm_text, itm_mask, itm_image_mask)  # [3b, 2]
        itm_labels = torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                                torch.zeros(2 * batch, dtype=torch.long, device=device)])
        weight = torch.cat([torch.ones(batch, device=device), valid_t2i.float(), valid_i2t.float()])
        per_pair = F.cross_entropy(itm_logits.float(), itm_labels, reduction="none")
        loss_itm = (per_pair * weight).sum() / weight.sum()
        itm_acc = ((itm_logits.argmax(dim=1) == itm_labels).float() * weight).sum() / weight.sum()
        return loss_itm, itm_acc

    def _itg_loss(self, text_ids: torch.Tensor, attention_mask: torch.Tensor,
                  query_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """ITG: causal text ``[b, L]`` over the ITC pass's query keys/values; label-smoothed next-token
        cross-entropy over the non-padding targets."""
        itg_logits = self.itg_logits(text_ids, attention_mask, query_kv)  # [b, L, V]
        labels = text_ids.masked_fill(attention_mask == 0, -100)
        return F.cross_entropy(itg_logits[:, :-1].reshape(-1, itg_logits.shape[-1]).float(),
                               labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=self.label_smoothing)

    # ----------------------------------------------------------------------------- retrieval

    @torch.no_grad()
    def retrieval_scores(self, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *, k: int = 16, batch_size: int = 64,
                         image_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """BLIP-2's retrieval protocol (LAVIS ``compute_sim_matrix``): ITC scores of every pair, then the
        top ``k`` candidates of each image (texts) and of each text (images) re-scored by
        ``ITM match logit + ITC score``; the other entries are -100.

        Args:
            image_embeds: ``[N_img, S, W]``; text_ids, attention_mask: ``[N_txt, L]``.
            k: candidates re-ranked per query; batch_size: pairs per ITM forward.

        Returns:
            ``{"itc": [N_img, N_txt], "itm_i2t": [N_img, N_txt], "itm_t2i": [N_txt, N_img]}`` (fp32).
        """
        check_positive_int("k", k)
        check_positive_int("batch_size", batch_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(text_ids)
        image_feats = torch.cat([self.image_features(image_embeds[i:i + batch_size],
                                                     None if image_mask is None else image_mask[i:i + batch_size])
                                 for i in range(0, len(image_embeds), batch_size)])
        text_feats = torch.cat([self.text_features(text_ids[i:i + batch_size], attention_mask[i:i + batch_size])
                                for i in range(0, len(text_ids), batch_size)])
        itc = self.similarity(image_feats, text_feats).float()  # [N_img, N_txt]

        def rerank(scores: torch.Tensor, query_is_image: bool) -> torch.Tensor:
            top_sim, top_idx = scores.topk(min(k, scores.shape[1]), dim=1)  # [Nq, k]
            queries = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top_idx).reshape(-1)
            candidates = top_idx.reshape(-1)
            images, texts = (queries, candidates) if query_is_image else (candidates, queries)
            match = torch.cat([
                self.itm_logits(image_embeds[images[i:i + batch_size]], text_ids[texts[i:i + batch_size]],
                                attention_mask[texts[i:i + batch_size]],
                                None if image_mask is None else image_mask[images[i:i + batch_size]])[:, 1]
                for i in range(0, len(queries), batch_size)]).float()
            out = torch.full_like(scores, -100.0)
            return out.scatter_(1, top_idx, match.view_as(top_sim) + top_sim)

        return {"itc": itc, "itm_i2t": rerank(itc, True), "itm_t2i": rerank(itc.T.contiguous(), False)}

    # ----------------------------------------------------------------------------- weights

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """:func:`vlmcore.blip2.convert.load_hf_stage1_state_dict` (``Blip2ForImageTextRetrieval`` weights)."""
        return convert.load_hf_stage1_state_dict(self, state_dict, strict=strict)


def _check_batch(image_embeds: torch.Tensor, image_ids: torch.Tensor | None, batch: int) -> None:
    """Raise ``ValueError`` unless ``image_embeds`` is ``[batch, S, W]`` and ``image_ids`` None or ``[batch]``."""
    if image_embeds.dim() != 3 or image_embeds.shape[0] != batch:
        raise ValueError(f"image_embeds must be [b, S, W] with text_ids' batch {batch}, got "
                         f"{tuple(image_embeds.shape)}")
    if image_ids is not None and (not isinstance(image_ids, torch.Tensor) or tuple(image_ids.shape) != (batch,)):
        raise ValueError(f"image_ids must be a [b] = [{batch}] tensor, got "
                         f"{tuple(image_ids.shape) if isinstance(image_ids, torch.Tensor) else image_ids!r}")


def stage1_qformer_state(stage1: Blip2Stage1) -> dict[str, torch.Tensor]:
    """The ``qformer.*`` weights of a stage-1 model, for :meth:`Blip2LM.load_qformer_state_dict`."""
    return {f"qformer.{k}": v.detach() for k, v in stage1.qformer.named_parameters()}


__all__ = ["Blip2Stage1", "fetch_rows", "sample_hard_negatives", "soft_target_cross_entropy", "stage1_qformer_state"]
