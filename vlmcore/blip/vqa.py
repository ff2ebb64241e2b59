"""BLIP's VQA model (Li et al. 2022, section 5.3): question encoder -> answer decoder.

The image goes through the ViT; the question through the image-grounded text encoder (``[ENC]``
first, cross-attending every image token); the answer decoder cross-attends the question's states
(not the image) and generates the answer (salesforce ``BLIP_VQA``, Hugging Face
``BlipForQuestionAnswering``, LAVIS ``BlipVQA``). Unlike the pre-training model, encoder and
decoder share no parameters: each is its own :class:`~vlmcore.blip.text.MEDTextModel`, keeping only
the self-attention block of its mode.

- training: :meth:`BlipVQA.forward`, the answers' LM loss weighted per answer (several answers per
  question, each with a weight: VQAv2's answer frequencies), summed and divided by the number of
  questions, as salesforce;
- inference: :meth:`BlipVQA.rank_answers` (the top ``k_test`` candidates of a fixed answer list by
  first-token probability, re-ranked by their whole answer's loss) and :meth:`BlipVQA.generate`
  (beam search / greedy over Hugging Face's ``GenerationMixin``).

Weights load from Hugging Face ``BlipForQuestionAnswering`` and salesforce ``BLIP_VQA`` state
dicts: :mod:`vlmcore.blip.heads_convert`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from vlmcore._checks import check_positive_int, check_token_ids
from vlmcore.blip import heads_convert
from vlmcore.blip.text import LMHead, MEDConfig, MEDTextModel, with_first_token
from vlmcore.vision import vision_width

#: BLIP's label smoothing of the answer loss (salesforce / LAVIS ``BertLMHeadModel``); the ranking
#: scores use the same smoothed loss.
LABEL_SMOOTHING = 0.1


def keep_self_attention(text_model: MEDTextModel, keep: str) -> MEDTextModel:
    """``text_model`` with only the self-attention block ``keep`` (``"attention"`` for an encoder,
    ``"decoder_attention"`` for a decoder) in every layer.

    A :class:`MEDLayer` holds both blocks because the pre-training model shares the rest of the
    layer; a stand-alone encoder or decoder (VQA, NLVR2) would otherwise carry a block that gets no
    gradient and has no counterpart in the checkpoints.
    """
    drop = {"attention": "decoder_attention", "decoder_attention": "attention"}[keep]
    for layer in text_model.encoder.layer:
        delattr(layer, drop)
    return text_model


class BlipVQA(nn.Module):
    """BLIP VQA: ViT + question encoder + answer decoder + LM head (module docstring).

    Args:
        visual_encoder: images ``[B, C, H, W]`` -> tokens ``[B, S, width]`` (:func:`blip_vision_encoder`
            to load Hugging Face / salesforce weights).
        text_config: the encoder's :class:`MEDConfig` (``encoder_width`` = the image token width); the
            decoder's is the same with ``encoder_width = hidden_size`` (it attends the question).
    """

    def __init__(self, visual_encoder: nn.Module, text_config: MEDConfig):
        super().__init__()
        if not isinstance(text_config, MEDConfig):
            raise TypeError(f"text_config must be a MEDConfig, got {type(text_config).__name__}")
        width = vision_width(visual_encoder)
        if width != text_config.encoder_width:
            raise ValueError(f"text_config.encoder_width ({text_config.encoder_width}) must equal the visual "
                             f"encoder's token width ({width})")
        self.config = text_config
        self.visual_encoder = visual_encoder
        self.text_encoder = keep_self_attention(MEDTextModel(text_config), "attention")
        decoder_config = dataclasses.replace(text_config, encoder_width=text_config.hidden_size)
        self.text_decoder = keep_self_attention(MEDTextModel(decoder_config), "decoder_attention")
        self.lm_head = LMHead(decoder_config)
        if text_config.tie_word_embeddings:
            self.lm_head.predictions.decoder.weight = self.text_decoder.embeddings.word_embeddings.weight

    def encode_question(self, images: torch.Tensor, question_ids: torch.Tensor,
                        question_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Question states ``[B, Lq, hidden]``: the image-grounded encoder over ``question_ids`` ``[B, Lq]``
        (first id replaced by ``[ENC]``, as salesforce) attending the images ``[B, C, H, W]``."""
        question_ids = with_first_token(question_ids, self.config.enc_token_id)
        return self.text_encoder(question_ids, question_mask, mode="multimodal",
                                 image_embeds=self.visual_encoder(images))

    def answer_logits(self, question_states: torch.Tensor, question_mask: torch.Tensor | None,
                      answer_ids: torch.Tensor, answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[N, La, vocab]`` of the answer decoder: ``answer_ids`` ``[N, La]`` (first id
        replaced by ``[DEC]``) attending row by row ``question_states`` ``[N, Lq, hidden]``, whose padding
        ``question_mask`` ``[N, Lq]`` (1 = token) hides."""
        answer_ids = with_first_token(answer_ids, self.config.bos_token_id)
        keys = None if question_mask is None else question_mask.bool()
        hidden = self.text_decoder(answer_ids, answer_mask, mode="decoder", image_embeds=question_states,
                                   image_mask=keys)
        return self.lm_head(hidden)

    def answer_loss(self, question_states: torch.Tensor, question_mask: torch.Tensor | None,
                    answer_ids: torch.Tensor, answer_mask: torch.Tensor | None = None, *,
                    label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
        """Per answer, the sum over its tokens (after ``[DEC]``, padding excluded) of the cross-entropy
        with ``label_smoothing``: fp32 ``[N]`` (salesforce's ``reduction='none'``). Shapes as
        :meth:`answer_logits`."""
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        targets = answer_ids[:, 1:].masked_fill(answer_ids[:, 1:] == self.config.pad_token_id, -100)
        if answer_mask is not None:
            targets = targets.masked_fill(answer_mask[:, 1:] == 0, -100)
        logits = self.answer_logits(question_states, question_mask, answer_ids, answer_mask)[:, :-1].float()
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                    label_smoothing=float(label_smoothing), reduction="none")
        return per_token.sum(1)

    def forward(self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor | None,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor | None, answer_weights: torch.Tensor,
                answer_question: torch.Tensor, *, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
        """BLIP's VQA training loss, an fp32 scalar: ``sum_i weight_i * answer_loss_i / B``.

        Args:
            images: ``[B, C, H, W]``; question_ids / question_mask: ``[B, Lq]``.
            answer_ids / answer_mask: ``[N, La]``, every answer of every question (``[CLS]``/``[DEC]``
                first, ``[SEP]`` last, then padding).
            answer_weights: ``[N]`` (VQAv2: the share of the 10 annotators who gave that answer).
            answer_question: ``[N]`` int64, the question (row of ``images``) each answer belongs to
                (salesforce's ``n`` answers per question, as an index).
        """
        check_token_ids("answer_ids", answer_ids)
        n = answer_ids.shape[0]
        if tuple(answer_weights.shape) != (n,) or tuple(answer_question.shape) != (n,):
            raise ValueError(f"answer_weights and answer_question must be [N={n}], got "
                             f"{tuple(answer_weights.shape)} and {tuple(answer_question.shape)}")
        if answer_question.dtype != torch.long:
            raise ValueError(f"answer_question must be int64 question indices, got {answer_question.dtype}")
        states = self.encode_question(images, question_ids, question_mask)
        mask = None if question_mask is None else question_mask[answer_question]
        losses = self.answer_loss(states[answer_question], mask, answer_ids, answer_mask,
                                  label_smoothing=label_smoothing)
        return (answer_weights.float() * losses).sum() / images.shape[0]

    @torch.no_grad()
    def rank_answers(self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor | None,
                     candidate_ids: torch.Tensor, candidate_mask: torch.Tensor | None = None, *,
                     k_test: int = 128) -> torch.Tensor:
        """The best candidate answer per question, ``[B]`` indices into ``candidate_ids`` ``[A, La]``.

        As salesforce ``rank_answer`` / LAVIS ``rank_answers``: the decoder's first-step distribution
        (input ``[DEC]`` alone) scores every candidate by the probability of its first token (column 1);
        the ``k_test`` most probable ones are decoded whole, and the one with the lowest
        :meth:`answer_loss` (label-smoothed, as theirs) wins.
        """
        check_positive_int("k_test", k_test)
        check_token_ids("candidate_ids", candidate_ids)
        if candidate_ids.dim() != 2 or candidate_ids.shape[1] < 2:
            raise ValueError(f"candidate_ids must be [A, La >= 2] ([DEC] + answer tokens), got "
                             f"{tuple(candidate_ids.shape)}")
        if candidate_mask is None:
            candidate_mask = torch.ones_like(candidate_ids)
        states = self.encode_question(images, question_ids, question_mask)
        b, k = states.shape[0], min(int(k_test), candidate_ids.shape[0])
        start = torch.full((b, 1), self.config.bos_token_id, dtype=torch.long, device=states.device)
        first_logits = self.answer_logits(states, question_mask, start)[:, 0].float()  # [B, vocab]
        first_probs = first_logits.softmax(-1).index_select(1, candidate_ids[:, 1])  # [B, A]
        top = first_probs.topk(k, dim=1).indices  # [B, k]
        ids, mask = candidate_ids[top.reshape(-1)], candidate_mask[top.reshape(-1)]  # [B*k, La]
        rows = torch.arange(b, device=states.device).repeat_interleave(k)
        loss = self.answer_loss(states[rows], None if question_mask is None else question_mask[rows], ids, mask)
        best = loss.view(b, k).argmin(1)
        return top.gather(1, best[:, None])[:, 0]

    @torch.no_grad()
    def generate(self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor | None = None,
                 *, num_beams: int = 3, max_length: int = 10, min_length: int = 1,
                 **generate_kwargs) -> torch.Tensor:
        """Answers for the questions, as Hugging Face ``BlipForQuestionAnswering.generate`` (salesforce:
        3 beams, 10 tokens at most, 1 at least): decoding starts from ``[DEC]`` and stops at ``[SEP]``;
        extra keyword arguments go to ``GenerationMixin.generate`` (``num_beams=1`` is greedy).

        The decoder attends the question's padding-masked states (HF and salesforce attend the padding
        too; the two agree on unpadded questions). Returns ``[B * num_return_sequences, T]`` ids
        starting with ``[DEC]``, padded with ``pad_token_id`` (what HF returns).
        """
        check_positive_int("max_length", max_length)
        states = self.encode_question(images, question_ids, question_mask)
        if question_mask is None:
            question_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        start = torch.full((states.shape[0], 1), self.config.bos_token_id, dtype=torch.long, device=states.device)
        return _answer_decoder_class()(self).generate(
            input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=states,
            encoder_attention_mask=question_mask, num_beams=int(num_beams), max_length=int(max_length),
            min_length=int(min_length), eos_token_id=self.config.sep_token_id,
            pad_token_id=self.config.pad_token_id, bos_token_id=self.config.bos_token_id, use_cache=False,
            **generate_kwargs)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """:func:`vlmcore.blip.heads_convert.load_hf_vqa_state_dict` (``BlipForQuestionAnswering``)."""
        heads_convert.load_hf_vqa_state_dict(self, state_dict)

    def load_salesforce_state_dict(self, state_dict: dict[str, torch.Tensor] | str, **kwargs) -> None:
        """:func:`vlmcore.blip.heads_convert.load_salesforce_vqa_state_dict` (salesforce ``BLIP_VQA``)."""
        heads_convert.load_salesforce_vqa_state_dict(self, state_dict, **kwargs)


@functools.cache
def _answer_decoder_class():
    """:class:`AnswerDecoder`, built once on first use (transformers is imported lazily)."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class AnswerDecoder(PreTrainedModel, GenerationMixin):
        """The VQA answer decoder behind Hugging Face's ``GenerationMixin`` (beam search, logits
        processors), around the model's own modules. ``GenerationMixin`` repeats the question states
        and their mask per beam (they are model keyword arguments). No KV cache: answers are short."""

        main_input_name = "input_ids"

        def __init__(self, model: BlipVQA):
            config = PretrainedConfig(vocab_size=model.config.vocab_size, bos_token_id=model.config.bos_token_id,
                                      eos_token_id=model.config.sep_token_id, pad_token_id=model.config.pad_token_id)
            super().__init__(config)
            self.vqa = model

        def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                    **_):
            logits = self.vqa.answer_logits(encoder_hidden_states, encoder_attention_mask, input_ids, attention_mask)
            return CausalLMOutput(logits=logits)

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, encoder_hidden_states=None,
                                          encoder_attention_mask=None, **_):
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "encoder_hidden_states": encoder_hidden_states, "encoder_attention_mask": encoder_attention_mask}

    return AnswerDecoder
