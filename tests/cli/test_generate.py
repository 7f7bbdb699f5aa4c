"""`mzoo generate`: greedy decoding with the inference cache (recurrent states for Mamba) equals
transformers' `generate` token for token (LLaMA, GPT-2, Qwen2, Qwen3, Qwen3-MoE, Mixtral, DeepSeek-V2 and -V3, GPT-OSS, Mamba-1,
Mamba-2 and a NemotronH hybrid), from Hugging Face and from a Megatron
checkpoint at another layout; sampling is reproducible and top-p keeps only the nucleus; text
prompts stream through the tokenizer token by token; bad input is one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model, make_moe_model
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, GPT2Config, GptOssConfig,
                          LlamaConfig, Mamba2Config, MambaConfig, MixtralConfig, NemotronHConfig, Qwen2Config,
                          Qwen3Config, Qwen3MoeConfig)
from typer.testing import CliRunner

from mzoo.cli.main import app
from mzoo.layout import Layout

VOCAB = 211
PROMPT = [5, 17, 99, 3, 42, 7]
DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64)
MODELS = {
    "llama-gqa": (make_hf_model, lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     max_position_embeddings=64)),
    "gpt2": (make_hf_model, lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=64)),
    "qwen2-tied": (make_hf_model, lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                      max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen3": (make_hf_model, lambda: Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, head_dim=32,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64)),
    "qwen3-moe": (make_moe_model, lambda: Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                         moe_intermediate_size=32, head_dim=32, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                                         num_experts_per_tok=2, norm_topk_prob=True,
                                                         mlp_only_layers=[1], max_position_embeddings=64)),
    "mixtral": (make_moe_model, lambda: MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                      num_local_experts=4, num_experts_per_tok=2,
                                                      max_position_embeddings=64)),
    "deepseek-v2": (make_moe_model, lambda: DeepseekV2Config(**DEEPSEEK, topk_method="greedy")),
    "deepseek-v3": (make_moe_model, lambda: DeepseekV3Config(**DEEPSEEK, n_group=2, topk_group=1,
                                                             routed_scaling_factor=2.5)),
    # windows of 4 over a 26-token decode, sinks and biases: the cache's keys outside the window are masked
    "gpt-oss": (make_moe_model, lambda: GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                     sliding_window=4, max_position_embeddings=64)),
    "mamba1": (make_hf_model, lambda: MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2,
                                                  expand=2, conv_kernel=4)),
    "mamba2": (make_hf_model, lambda: Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_heads=8, head_dim=16,
                                                   state_size=8, n_groups=2, num_hidden_layers=2, chunk_size=8,
                                                   expand=2)),
    "nemotron-h-hybrid": (make_moe_model, lambda: NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=48, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, chunk_size=8,
        layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"])),
}
runner = CliRunner()


def _transformers_greedy(path, n: int) -> list[int]:
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # run all n steps, as mzoo does without a tokenizer
    ref.generation_config.pad_token_id = 0
    out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def _mzoo(*args: str) -> dict:
    result = runner.invoke(app, ["generate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_transformers(tmp_path, name):
    make, config = MODELS[name]
    path = make(tmp_path / name, config())
    expected = _transformers_greedy(path, 20)
    got = _mzoo(str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "20")
    assert got["prompt_ids"] == PROMPT
    assert got["generated_ids"] == expected


def test_megatron_checkpoint_generates_the_same_tokens(tmp_path):
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
    from mzoo.ckpt.megatron.checkpoint import Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    make, config = MODELS["mixtral"]
    hf = make(tmp_path / "hf", config())
    convert(open_source(hf), tmp_path / "mcore", Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2, pp=2))))
    ids = ",".join(map(str, PROMPT))
    assert _mzoo(str(tmp_path / "mcore"), "--prompt-ids", ids, "--max-new-tokens", "12")["generated_ids"] == \
        _mzoo(str(hf), "--prompt-ids", ids, "--max-new-tokens", "12")["generated_ids"]


def test_sampling_is_reproducible_and_seed_dependent(tmp_path):
    make, config = MODELS["llama-gqa"]
    path = str(make(tmp_path / "m", config()))
    args = ["--prompt-ids", "1,2,3", "--max-new-tokens", "16", "--temperature", "1.5", "--top-p", "0.95"]
    a = _mzoo(path, *args, "--seed", "1")["generated_ids"]
    assert a == _mzoo(path, *args, "--seed", "1")["generated_ids"]
    assert a != _mzoo(path, *args, "--seed", "2")["generated_ids"]


def test_top_p_samples_only_the_nucleus():
    """next_token against a hand-computed nucleus: sorted probabilities 0.5, 0.3, 0.15, 0.05."""
    from mzoo.generate import GenerationConfig, next_token

    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)

    def frequencies(top_p: float) -> torch.Tensor:
        cfg = GenerationConfig(temperature=1.0, top_p=top_p)
        return torch.bincount(next_token(logits, cfg, torch.Generator().manual_seed(0)), minlength=4) / 4000

    assert torch.allclose(frequencies(1.0), probs, atol=0.03)  # no filter: every token, at its probability
    # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is tokens 1 and 3, renormalised to 0.5 / 0.8 and 0.3 / 0.8
    assert torch.allclose(frequencies(0.7), torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.03)
    assert frequencies(0.7)[[0, 2]].sum() == 0
    assert frequencies(0.4).tolist() == [0.0, 1.0, 0.0, 0.0]  # the argmax alone reaches 0.4


def test_tiny_top_p_samples_the_greedy_tokens(tmp_path):
    """Through the command: at temperature 1.5 a top-p below every argmax probability leaves one
    token per step, so sampling reproduces greedy decoding (without the filter it would not)."""
    make, config = MODELS["llama-gqa"]
    path = str(make(tmp_path / "m", config()))
    args = ["--prompt-ids", "1,2,3", "--max-new-tokens", "16"]
    greedy = _mzoo(path, *args)["generated_ids"]
    for seed in ("1", "2"):
        sampled = _mzoo(path, *args, "--temperature", "1.5", "--top-p", "0.001", "--seed", seed)
        assert sampled["generated_ids"] == greedy


def _word_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["[UNK]"] = 0
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(path)


def test_text_prompt_streams_through_the_tokenizer(tmp_path, monkeypatch, capsys):
    import mzoo.generate

    make, config = MODELS["llama-gqa"]
    path = make(tmp_path / "m", config())
    _word_tokenizer(path)
    got = _mzoo(str(path), "--prompt", "w5 w17 w99", "--max-new-tokens", "5")
    assert got["prompt_ids"] == [5, 17, 99] and len(got["generated_ids"]) == 5
    assert got["text"].split() == [f"w{i}" for i in got["generated_ids"]]
    capsys.readouterr()
    # what the command has printed each time the sampler is about to choose the next token
    printed: list[str] = []
    choose = mzoo.generate.next_token

    def watched(*args, **kwargs):
        printed.append(capsys.readouterr().out)
        return choose(*args, **kwargs)

    monkeypatch.setattr(mzoo.generate, "next_token", watched)
    app(["generate", str(path), "--prompt", "w5 w17 w99", "--max-new-tokens", "5"], standalone_mode=False)
    printed.append(capsys.readouterr().out)
    words = [f" w{i}" for i in got["generated_ids"]]
    # the prompt first, then each word as soon as its token is made, before the next one is chosen
    assert printed == ["w5 w17 w99", *words[:-1], words[-1] + "\n"]


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", ",".join(["1"] * 64)], "context is 64"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,9999"], "outside the vocabulary"),
    ([], "exactly one of"),
    (["--prompt", "hello"], "has no tokenizer"),
    (["--prompt-ids", "1", "--top-p", "0"], "--top-p"),
])
def test_bad_input_is_one_sentence(tmp_path, args, message):
    make, config = MODELS["llama-gqa"]
    path = make(tmp_path / "m", config())
    result = runner.invoke(app, ["generate", str(path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
