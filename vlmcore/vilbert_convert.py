"""vilbert-multi-task checkpoint conversion for :class:`vlmcore.ViLBERT`, both ways, by name.

vilbert-multi-task (github facebookresearch/vilbert-multi-task, ``vilbert/vilbert.py``) keeps the
two-stream encoder under ``bert.`` (``BertModel``) and the pre-training heads under ``cls.``
(``BertPreTrainingHeads``); its task model ``VILBertForVLTasks`` adds task heads beside them. Names:

====================================================  ==============================================
vilbert-multi-task                                    vlmcore :class:`~vlmcore.vilbert.ViLBERT`
====================================================  ==============================================
``bert.embeddings.{word,position,token_type}_emb..``  ``text_embeddings.*`` (``LayerNorm`` -> ``norm``)
``bert.v_embeddings.image_embeddings``                ``region_embeddings.feature_embeddings``
``bert.v_embeddings.image_location_embeddings``       ``region_embeddings.location_embeddings``
``bert.encoder.layer.N`` / ``v_layer.N``              ``text_layers.N`` / ``visual_layers.N``
  ``attention.self.{query,key,value}``                  ``{query,key,value}``
  ``attention.output.dense`` / ``.LayerNorm``           ``attn_output`` / ``attn_norm``
  ``intermediate.dense``, ``output.dense``,             ``ffn.intermediate``, ``ffn.output``,
  ``output.LayerNorm``                                  ``ffn.norm``
``bert.encoder.c_layer.N``                            ``co_layers.N``
  ``biattention.{query1,key1,value1}`` (regions)        ``v_{query,key,value}``
  ``biattention.{query2,key2,value2}`` (text)           ``t_{query,key,value}``
  ``biOutput.dense1`` / ``LayerNorm1``                  ``v_attn_output`` / ``v_attn_norm``
  ``biOutput.dense2`` / ``LayerNorm2``                  ``t_attn_output`` / ``t_attn_norm``
  ``v_intermediate``, ``v_output``                      ``v_ffn`` (as a stream layer's FFN)
  ``t_intermediate``, ``t_output``                      ``t_ffn``
``bert.t_pooler.dense`` / ``bert.v_pooler.dense``     ``text_pooler`` / ``visual_pooler``
``cls.predictions.transform.*`` / ``.bias``           ``mlm_transform.*`` / ``mlm_bias``
``cls.imagePredictions.transform.*`` / ``.decoder``   ``region_transform.*`` / ``region_decoder``
``cls.bi_seq_relationship``                           ``alignment_head``
====================================================  ==============================================

Both sides keep q/k/v as separate linears, so nothing is split or concatenated. Where the two differ:

- ``biOutput.q_dense1`` / ``q_dense2``: built by the reference but never used by its forward; no
  counterpart here. Loading ignores them; the export writes zeros there (the reference never reads them).
- ``cls.predictions.decoder.weight``: the reference ties it to the word embeddings (as we tie
  ``mlm_logits``); loading ignores the duplicate, the export writes the word embeddings there.
- ``bert.embeddings.position_embeddings``: the reference keeps 512 rows, we keep
  ``max_position_embeddings`` (the context length + 1): loading takes the checkpoint's first rows,
  a checkpoint with fewer rows than ours is reported mis-shaped.
- Task heads of ``VILBertForVLTasks`` (:data:`TASK_HEAD_PREFIXES`): we train the pre-training heads
  only, so loading ignores them (the documented allow-list).
- No counterpart, so reported as unexpected keys: ``bert.embeddings.task_embeddings`` (the
  multi-task model's task tokens, ``task_specific_tokens``) and ``v_layer.N.attention.self.dyLinear_*``
  (``dynamic_attention``).
- The layer plan (``v_biattention_id`` / ``t_biattention_id``) is not in the weights: the config must
  give the plan the checkpoint was trained with (``bert_base_6layer_6conect``: ``[0..5]``, ``[6..11]``).
- Numerics: the reference adds -10000 to padded keys, we drop them exactly (equal in fp32 unless
  every key is padding, where we return a zero context and it averages the padding); the reference's
  attention-probability dropout has no counterpart (ours drops hidden states only).
"""

from __future__ import annotations

import torch

from vlmcore.checkpoint_keys import check_keys
from vlmcore.vilbert import ViLBERT, ViLBERTConfig

#: ``VILBertForVLTasks``' task heads (VQA, GQA, NLVR2, retrieval, entailment, grounding): no counterpart.
TASK_HEAD_PREFIXES = ("vil_prediction.", "vil_prediction_gqa.", "vil_binary_prediction.", "vil_logit.",
                      "vil_tri_prediction.", "vision_logit.", "linguisic_logit.")
TIED_DECODER = "cls.predictions.decoder.weight"
POSITION_EMBEDDINGS = "bert.embeddings.position_embeddings.weight"
#: The peer's ``BertImageEmbeddings`` hard-codes 5 box coordinates (x1, y1, x2, y2, area).
PEER_LOC_SIZE = 5
#: ... and every ``BertLayerNorm`` with this epsilon (not a config field there).
PEER_LAYER_NORM_EPS = 1e-12

_STREAM_LAYER = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attn_output": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                 "ffn.intermediate": "intermediate.dense", "ffn.output": "output.dense", "ffn.norm": "output.LayerNorm"}
_CO_LAYER = {"v_query": "biattention.query1", "v_key": "biattention.key1", "v_value": "biattention.value1",
             "t_query": "biattention.query2", "t_key": "biattention.key2", "t_value": "biattention.value2",
             "v_attn_output": "biOutput.dense1", "v_attn_norm": "biOutput.LayerNorm1",
             "t_attn_output": "biOutput.dense2", "t_attn_norm": "biOutput.LayerNorm2",
             "v_ffn.intermediate": "v_intermediate.dense", "v_ffn.output": "v_output.dense",
             "v_ffn.norm": "v_output.LayerNorm", "t_ffn.intermediate": "t_intermediate.dense",
             "t_ffn.output": "t_output.dense", "t_ffn.norm": "t_output.LayerNorm"}
_TOP = {"text_embeddings.word_embeddings": "bert.embeddings.word_embeddings",
        "text_embeddings.position_embeddings": "bert.embeddings.position_embeddings",
        "text_embeddings.token_type_embeddings": "bert.embeddings.token_type_embeddings",
        "text_embeddings.norm": "bert.embeddings.LayerNorm",
        "region_embeddings.feature_embeddings": "bert.v_embeddings.image_embeddings",
        "region_embeddings.location_embeddings": "bert.v_embeddings.image_location_embeddings",
        "region_embeddings.norm": "bert.v_embeddings.LayerNorm",
        "text_pooler": "bert.t_pooler.dense", "visual_pooler": "bert.v_pooler.dense",
        "mlm_transform.dense": "cls.predictions.transform.dense",
        "mlm_transform.norm": "cls.predictions.transform.LayerNorm",
        "region_transform.dense": "cls.imagePredictions.transform.dense",
        "region_transform.norm": "cls.imagePredictions.transform.LayerNorm",
        "region_decoder": "cls.imagePredictions.decoder", "alignment_head": "cls.bi_seq_relationship"}


def _module_names(config: ViLBERTConfig) -> dict[str, str]:
    """Our module path -> the peer's, for every module holding parameters."""
    names = dict(_TOP)
    for ours, peer, count, table in (("text_layers", "bert.encoder.layer", config.num_hidden_layers, _STREAM_LAYER),
                                     ("visual_layers", "bert.encoder.v_layer", config.v_num_hidden_layers,
                                      _STREAM_LAYER),
                                     ("co_layers", "bert.encoder.c_layer", len(config.v_biattention_id), _CO_LAYER)):
        for i in range(count):
            names.update({f"{ours}.{i}.{a}": f"{peer}.{i}.{b}" for a, b in table.items()})
    return names


def peer_key_map(model: ViLBERT) -> dict[str, str]:
    """Our state-dict key -> the vilbert-multi-task key holding the same tensor, for every key of ``model``."""
    modules = _module_names(model.config)
    out = {"mlm_bias": "cls.predictions.bias"}
    for key in model.state_dict():
        if key not in out:
            module, _, leaf = key.rpartition(".")
            out[key] = f"{modules[module]}.{leaf}"
    return out


def _unused_output_projections(config: ViLBERTConfig) -> dict[str, tuple[int, int]]:
    """The peer's ``biOutput.q_dense1`` / ``q_dense2`` weight shapes (``[out, in]``) per co-attention block."""
    out = {}
    for i in range(len(config.v_biattention_id)):
        for name, width in (("q_dense1", config.v_hidden_size), ("q_dense2", config.hidden_size)):
            out[f"bert.encoder.c_layer.{i}.biOutput.{name}"] = (width, config.bi_hidden_size)
    return out


def _ignored(key: str, config: ViLBERTConfig) -> bool:
    """Whether a checkpoint key is on the allow-list: a task head, the tied decoder, an unused q_dense."""
    module = key.rpartition(".")[0]
    return key.startswith(TASK_HEAD_PREFIXES) or key == TIED_DECODER or module in _unused_output_projections(config)


def load_vilbert_multitask_state_dict(model: ViLBERT, state_dict: dict[str, torch.Tensor],
                                      source: str = "vilbert-multi-task checkpoint") -> list[str]:
    """Load a vilbert-multi-task state dict (``BertForMultiModalPreTraining`` or ``VILBertForVLTasks``;
    keys may carry DataParallel's ``module.`` prefix) into ``model``, every parameter by name.

    One :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` (subject ``source``) names, in the
    checkpoint's names, the keys it lacks, the keys that map to nothing and are not allowed (see the
    module docstring), and the tensors of another shape (a different architecture in the config).

    Returns:
        the allowed checkpoint keys that were not loaded (task heads, the tied decoder, ``q_dense*``).
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    names = peer_key_map(model)
    ours = model.state_dict()
    loaded, missing, mismatched = {}, [], []
    for key, peer in names.items():
        if peer not in state:
            missing.append(peer)
            continue
        value = state[peer]
        if peer == POSITION_EMBEDDINGS and value.shape[0] >= ours[key].shape[0]:
            value = value[: ours[key].shape[0]]  # the peer keeps 512 positions, we keep the context's
        if value.shape != ours[key].shape:
            mismatched.append(f"{peer}: {tuple(state[peer].shape)} vs {tuple(ours[key].shape)}")
        else:
            loaded[key] = value
    taken = set(names.values())
    unused = [k for k in state if k not in taken]
    ignored = [k for k in unused if _ignored(k, model.config)]
    unexpected = sorted(set(unused) - set(ignored))
    check_keys(source, missing, unexpected, mismatched,
               hint="vilbert-multi-task's names; a different architecture in the config, or task tokens / "
                    "dynamic attention, which have no counterpart here")
    model.load_state_dict(loaded, strict=True)
    return sorted(ignored)


def vilbert_multitask_state_dict(model: ViLBERT) -> dict[str, torch.Tensor]:
    """``model``'s weights as vilbert-multi-task's ``BertForMultiModalPreTraining`` state dict (CPU,
    contiguous): every key its ``load_state_dict(..., strict=True)`` needs, the tied
    ``cls.predictions.decoder.weight`` and the unused ``q_dense*`` (zeros) included.
    ``VILBertForVLTasks.from_pretrained`` reads the same file (its task heads start fresh)."""
    ours = model.state_dict()
    state = {peer: ours[key] for key, peer in peer_key_map(model).items()}
    state[TIED_DECODER] = ours["text_embeddings.word_embeddings.weight"]
    dtype = ours["text_pooler.weight"].dtype
    for module, shape in _unused_output_projections(model.config).items():
        state[f"{module}.weight"] = torch.zeros(shape, dtype=dtype)
        state[f"{module}.bias"] = torch.zeros(shape[0], dtype=dtype)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def vilbert_multitask_config(config: ViLBERTConfig, where: str = "config") -> dict:
    """The ``bert_base_6layer_6conect.json``-style config of ``config`` (vilbert-multi-task's
    ``BertConfig.from_json_file`` reads it). Raises ValueError naming ``where.<field>`` when the
    reference cannot build this model: a tanh pooler (it pools with ReLU), a box width other than 5,
    a LayerNorm epsilon other than its fixed 1e-12, or a co-attention block after a stream's last
    layer (its ``BertConfig`` asserts every ``*_biattention_id`` < the stream's layer count)."""
    problems = []
    if config.pooler_activation != "relu":
        problems.append(f"{where}.pooler_activation: {config.pooler_activation!r} (vilbert-multi-task pools "
                        "with ReLU)")
    if config.v_loc_size != PEER_LOC_SIZE:
        problems.append(f"{where}.v_loc_size: {config.v_loc_size} (vilbert-multi-task: {PEER_LOC_SIZE})")
    if config.layer_norm_eps != PEER_LAYER_NORM_EPS:
        problems.append(f"{where}.layer_norm_eps: {config.layer_norm_eps} (vilbert-multi-task: {PEER_LAYER_NORM_EPS})")
    for name, ids, layers in (("v_biattention_id", config.v_biattention_id, config.v_num_hidden_layers),
                              ("t_biattention_id", config.t_biattention_id, config.num_hidden_layers)):
        if not ids or max(ids) >= layers:
            problems.append(f"{where}.{name}: {list(ids)} (vilbert-multi-task needs at least one block and every "
                            f"id < {layers}, the stream's layer count)")
    if problems:
        raise ValueError("vilbert-multi-task cannot build this model: " + "; ".join(problems))
    dropout = config.hidden_dropout_prob
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": "gelu", "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout, "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "initializer_range": config.initializer_range,
        "v_feature_size": config.v_feature_size, "v_target_size": config.v_target_size,
        "v_hidden_size": config.v_hidden_size, "v_num_hidden_layers": config.v_num_hidden_layers,
        "v_num_attention_heads": config.v_num_attention_heads, "v_intermediate_size": config.v_intermediate_size,
        "bi_hidden_size": config.bi_hidden_size, "bi_num_attention_heads": config.bi_num_attention_heads,
        "bi_intermediate_size": config.v_intermediate_size, "bi_attention_type": 1,
        "v_attention_probs_dropout_prob": dropout, "v_hidden_act": "gelu", "v_hidden_dropout_prob": dropout,
        "v_initializer_range": config.initializer_range, "v_biattention_id": list(config.v_biattention_id),
        "t_biattention_id": list(config.t_biattention_id), "pooling_method": "mul", "fusion_method": "mul",
        "visual_target": 0,
    }
