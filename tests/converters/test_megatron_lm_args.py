"""mzoo's Megatron args are Megatron-LM's full set: every field its parser sets (lm_defaults.py's
table), flags consistent with the model (GELU form, bias fusion, sequence parallelism, tokenizer),
and a tracker every Megatron-LM release accepts ("release" for converted weights). Where Megatron-LM's
training package is installed (megatron-core >= 0.19 ships it: `make test-mcore-latest`) its own
load_args_from_checkpoint reads mzoo's legacy and torch_dist checkpoints with no shim."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
import torch

from mzoo.ckpt.megatron.args import args_to_config, config_to_args
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
from mzoo.ckpt.megatron.lm_defaults import lm_defaults
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout
from mzoo.zoo import resolve

GELU_FLAGS = {  # activation, biases -> (openai_gelu, bias_gelu_fusion, swiglu, squared_relu)
    ("gelu_tanh", True): (True, True, False, False),  # megatron-core's fused bias_gelu is the tanh form
    ("gelu_tanh", False): (True, False, False, False),
    ("gelu", True): (False, False, False, False),  # exact erf GELU: no fusion (it would swap in tanh)
    ("swiglu", False): (False, False, True, False),
    ("squared_relu", False): (False, False, False, True),  # fusion on would be refused by validate_args
}


def test_args_hold_every_field_megatron_lm_sets():
    args = vars(config_to_args(resolve("llama3-8b"), MegatronCheckpoint(layout=Layout(tp=2, sequence_parallel=True)),
                               torch.bfloat16))
    assert set(lm_defaults()) <= set(args) and len(args) > 800
    assert args["heterogeneous_layers_config_path"] is None  # where Megatron-Bridge's loader stopped
    assert args["sequence_parallel"] and args["tensor_model_parallel_size"] == 2
    assert args["apply_query_key_layer_scaling"] is False and args["tokenizer_type"] == "NullTokenizer"


@pytest.mark.parametrize("activation, bias", GELU_FLAGS, ids=[f"{a}-{'bias' if b else 'nobias'}" for a, b in GELU_FLAGS])
def test_activation_flags_are_what_megatron_lm_needs(activation, bias):
    cfg = resolve("gpt-tiny").replace(activation=activation, add_bias_linear=bias, add_qkv_bias=bias)
    args = config_to_args(cfg, MegatronCheckpoint(), torch.float32)
    assert (args.openai_gelu, args.bias_gelu_fusion, args.swiglu, args.squared_relu) == GELU_FLAGS[(activation, bias)]
    assert args_to_config(args).activation == activation
    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("mzoo_")})
    assert args_to_config(plain).activation == activation  # from Megatron-LM's own flags alone


def test_megatron_lm_checkpoint_with_default_gelu_fusion_reads_as_tanh():
    """A GPT trained by Megatron-LM with its defaults (F.gelu, --bias-gelu-fusion on, biases) computes
    the tanh form: mzoo reads it so."""
    args = config_to_args(resolve("gpt-tiny").replace(activation="gelu"), MegatronCheckpoint(), torch.float32)
    real = argparse.Namespace(**{**{k: v for k, v in vars(args).items() if not k.startswith("mzoo_")},
                                 "bias_gelu_fusion": True, "openai_gelu": False})
    assert args_to_config(real).activation == "gelu_tanh"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import make_hf_model
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    from mzoo.train.bpe import corpus_texts, train_bpe

    path = make_hf_model(tmp_path_factory.mktemp("hf") / "llama", config)
    train_bpe(corpus_texts()[:50], 200, path)  # the tokenizer travels: args name its folder
    return path


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_megatron_lm_reads_mzoo_args(llama, tmp_path, fmt, monkeypatch):
    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("Megatron-LM's training package ships with megatron-core >= 0.19: make test-mcore-latest")
    from megatron.training.arguments import parse_args  # no CPU shim: reading args needs no GPU
    from megatron.training.checkpointing import load_args_from_checkpoint

    out = tmp_path / "ckpt"
    convert(open_source(llama), out, Target(fmt, MegatronCheckpoint(layout=Layout(tp=2))))
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", "--use-checkpoint-args", "--load", str(out),
                                      "--micro-batch-size", "1", "--ckpt-format", fmt])
    args = load_args_from_checkpoint(parse_args(ignore_unknown_args=True))
    args = args[0] if isinstance(args, tuple) else args  # 0.19: (args, checkpoint_args)
    cfg = open_source(out).cfg
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_query_groups,
            args.ffn_hidden_size) == (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, 2, cfg.ffn_hidden_size)
    assert args.swiglu and args.normalization == "RMSNorm"  # (TP comes from the command line unless --use-mp-args-from-checkpoint-args)
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model.endswith("release/tokenizer")
    assert args.iteration == 0 and args.untie_embeddings_and_output_weights
