"""mzoo forward logits vs transformers' own models with the same weights (fp32, max |Δ| <= 1e-4)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from mzoo.converters.hf import load_hf_model
from mzoo.jobs.verify import sample_tokens

LLAMA_CASES = {
    "mha": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=160),
    "gqa": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128),
    "mqa-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
                     tie_word_embeddings=True),
    "odd-96-6h-3g": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=200,
                         vocab_size=997),
    "llama3-scaling": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}),
    "linear-scaling": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                           rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "head-dim-32": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                        head_dim=32),
    "biases": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                   attention_bias=True, mlp_bias=True),
}

# Qwen2: q/k/v biases, no o bias; Qwen3: per-head q/k RMSNorm, head_dim of its own (not hidden / heads)
QWEN_CASES = {
    "qwen2-gqa": lambda kw: Qwen2Config(**kw, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=160, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1e6}),
    "qwen2-tied-mqa": lambda kw: Qwen2Config(**kw, hidden_size=96, num_attention_heads=6, num_key_value_heads=1,
                                             intermediate_size=128, tie_word_embeddings=True),
    "qwen3-head-dim-32": lambda kw: Qwen3Config(**kw, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=32, intermediate_size=160),
    "qwen3-tied-head-dim-16": lambda kw: Qwen3Config(**kw, hidden_size=64, num_attention_heads=8,
                                                     num_key_value_heads=4, head_dim=16, intermediate_size=96,
                                                     tie_word_embeddings=True),
}

GPT2_CASES = {
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2),
    "gpt2-odd": dict(n_embd=96, n_head=6, n_layer=3, vocab_size=1001, n_inner=200),
    "gpt2-relu-untied": dict(n_embd=64, n_head=2, n_layer=2, activation_function="relu", tie_word_embeddings=False),
}


def _compare(path, vocab):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, ours = load_hf_model(path)
    ids = sample_tokens(vocab, batch=2, seq=40)
    with torch.no_grad():
        expected, got = ref(ids).logits, ours.eval()(ids)
    assert got.shape == expected.shape
    diff = (expected - got).abs().max().item()
    assert diff <= 1e-4, diff
    return diff


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_matches_transformers(hf_factory, case):
    kw = dict(vocab_size=1000, num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    kw.update(LLAMA_CASES[case])
    path = hf_factory(LlamaConfig(**kw))
    _compare(path, kw["vocab_size"])


@pytest.mark.parametrize("case", QWEN_CASES)
def test_qwen_matches_transformers(hf_factory, case):
    kw = dict(vocab_size=1000, num_hidden_layers=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    _compare(hf_factory(QWEN_CASES[case](kw)), kw["vocab_size"])


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_matches_transformers(hf_factory, case):
    kw = dict(vocab_size=1000, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kw.update(GPT2_CASES[case])
    path = hf_factory(GPT2Config(**kw))
    _compare(path, kw["vocab_size"])


def test_padded_vocab_rows_do_not_leak(hf_factory):
    """The model's embedding is padded to a multiple of 128; logits stay on the true vocabulary."""
    path = hf_factory(LlamaConfig(vocab_size=130, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64))
    cfg, model = load_hf_model(path)
    assert model.embedding.word_embeddings.weight.shape[0] == 256
    assert model(torch.tensor([[1, 2, 3]])).shape[-1] == 130
