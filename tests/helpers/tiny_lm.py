"""Tiny transformers causal LMs (Llama, OPT, Qwen2, GPT-2 configs; random weights, no download)."""

from __future__ import annotations

from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB, MEDIA = 48, 3


def tiny_lm(kind: str, layers: int = 2) -> nn.Module:
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(config).eval()
    if kind == "opt":
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0)
        return OPTForCausalLM(config).eval()
    if kind == "qwen2":
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()
