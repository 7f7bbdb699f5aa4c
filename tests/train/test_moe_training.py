"""Mixture-of-experts training across layouts: EP2, EP2 x TP2 (with and without SP), EP2 x PP2 and
EP4 on real gloo ranks give the loss curve of one process holding every expert, step for step
(fp32, 1e-5), for a Mixtral-style model (softmax top-2, load-balancing loss) and a DeepSeek-V3-style
one (MLA, a dense first layer, a shared expert, sigmoid group-limited routing with the
aux-loss-free expert bias updated every step), a Qwen3-MoE one (q/k norms, unnormalised top-k
weights, a dense layer listed in mlp_only_layers) at EP2, EP2 x TP2 + SP and EP2 x PP2, and a GPT-OSS-style
one (sinks, sliding windows, biased router and experts, clamped GLU) at EP2, TP2 (SP) and PP2."""

from __future__ import annotations

import dist as D
import pytest
import torch
from test_training_parity import counting_sampler

from mzoo.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig
from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer

MIXTRAL = ModelConfig(family="mixtral", vocab_size=250, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=48, max_position_embeddings=64,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=48, aux_loss_coeff=1e-2))
DEEPSEEK = ModelConfig(
    family="deepseek", vocab_size=250, hidden_size=32, num_layers=4, num_attention_heads=4, ffn_hidden_size=64,
    max_position_embeddings=64,
    rope=RopeConfig(scaling="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0),
    moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden_size=16, num_shared_experts=1, score_function="sigmoid",
                  expert_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense=1,
                  bias_update_rate=1e-2),
    mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
)
# Qwen3-MoE: q/k norms, head_dim 16 (not 32 / 4), raw softmax top-2 weights, layer 2 dense (mlp_only_layers)
QWEN3_MOE = ModelConfig(family="qwen3_moe", vocab_size=250, hidden_size=32, num_layers=4, num_attention_heads=4,
                        num_query_groups=2, head_dim=16, qk_layernorm=True, ffn_hidden_size=48,
                        max_position_embeddings=64,
                        moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=24, norm_topk_prob=False,
                                      dense_layers=[2], aux_loss_coeff=1e-2))
# GPT-OSS: sinks, windows of 4 on 16-token sequences, biases on attention, router and experts, clamped GLU
GPT_OSS = ModelConfig(
    family="gpt_oss", vocab_size=250, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
    head_dim=8, ffn_hidden_size=16, activation="quick_geglu", max_position_embeddings=64, add_bias_linear=True,
    add_qkv_bias=True, softmax_type="learnable", window_size=4, window_attn_skip_freq=2,
    activation_func_clamp_value=0.5, glu_linear_offset=1.0,
    rope=RopeConfig(theta=150000.0, scaling="yarn", factor=4.0, original_max_position_embeddings=16, truncate=False),
    moe=MoEConfig(num_experts=4, top_k=2, ffn_hidden_size=16, aux_loss_coeff=1e-2),
)
MODELS = {"mixtral": MIXTRAL, "deepseek": DEEPSEEK, "qwen3-moe": QWEN3_MOE, "gpt-oss": GPT_OSS}
STEPS = 20


def _train(cfg: ModelConfig, state: ParallelState, distributed_optimizer: bool = False) -> dict:
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=STEPS, lr=3e-3, min_lr=3e-4, warmup=2,
                       distributed_optimizer=distributed_optimizer)
    model = build_chunks(cfg, state)
    model.init_weights(seed=5)
    trainer = Trainer(model, cfg, state, tcfg, counting_sampler(cfg.vocab_size, tcfg.seq_len))
    losses = [log.loss for log in trainer.train()]
    biases = {n: p.detach().clone() for n, p in model.canonical_parameters() if n.endswith("expert_bias")}
    return {"losses": losses, "biases": biases}


def _worker(rank, world, name, layout, distributed_optimizer):
    torch.manual_seed(0)
    state = ParallelState.build(Layout(**layout))
    return _train(MODELS[name], state, distributed_optimizer)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return {name: _train(cfg, ParallelState.single()) for name, cfg in MODELS.items()}


@pytest.mark.parametrize("name", MODELS)
def test_single_process_learns_and_balances(reference, name):
    losses = reference[name]["losses"]
    assert losses[-1] < losses[0] - 0.3
    if name == "deepseek":  # the aux-free bias moved, by whole multiples of the rate
        for bias in reference[name]["biases"].values():
            assert bias.abs().max() > 0
            steps = bias / DEEPSEEK.moe.bias_update_rate
            assert torch.allclose(steps, steps.round(), atol=1e-3)


@pytest.mark.dist
@pytest.mark.parametrize(
    "name, layout, world, dist_opt",
    [
        ("mixtral", dict(dp=2, ep=2), 2, False),
        ("deepseek", dict(dp=2, ep=2), 2, True),
        ("mixtral", dict(tp=2, dp=2, ep=2), 4, False),
        ("deepseek", dict(tp=2, dp=2, ep=2, sequence_parallel=True), 4, False),
        ("mixtral", dict(pp=2, dp=2, ep=2), 4, True),
        ("deepseek", dict(pp=2, dp=2, ep=2), 4, False),
        ("mixtral", dict(dp=4, ep=4), 4, True),
        ("deepseek", dict(tp=2), 2, False),
        ("qwen3-moe", dict(dp=2, ep=2), 2, True),
        ("qwen3-moe", dict(tp=2, dp=2, ep=2, sequence_parallel=True), 4, False),
        ("qwen3-moe", dict(pp=2, dp=2, ep=2), 4, False),  # the second stage starts with the listed dense layer
        ("gpt-oss", dict(dp=2, ep=2), 2, False),
        ("gpt-oss", dict(tp=2, sequence_parallel=True), 2, False),
        ("gpt-oss", dict(pp=2), 2, False),  # stage 1's layer is global layer 1: full attention, not windowed
    ],
    ids=["mixtral-ep2", "deepseek-ep2-distopt", "mixtral-ep2xtp2", "deepseek-ep2xtp2-sp", "mixtral-ep2xpp2-distopt",
         "deepseek-ep2xpp2", "mixtral-ep4-distopt", "deepseek-tp2", "qwen3-moe-ep2-distopt", "qwen3-moe-ep2xtp2-sp",
         "qwen3-moe-ep2xpp2", "gpt-oss-ep2", "gpt-oss-tp2-sp", "gpt-oss-pp2"],
)
def test_moe_loss_curve_matches_single_process(reference, name, layout, world, dist_opt):
    expected = reference[name]
    for result in D.run(_worker, world, name, layout, dist_opt):
        diffs = [abs(a - b) for a, b in zip(result["losses"], expected["losses"])]
        assert len(diffs) == STEPS and max(diffs) <= 1e-5, diffs
        for key, bias in result["biases"].items():  # routing decisions (hence bias updates) identical
            assert torch.equal(bias, expected["biases"][key]), key
