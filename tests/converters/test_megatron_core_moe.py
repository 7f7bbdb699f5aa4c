"""Real megatron-core (0.16.1, local spec, SequentialMLP experts, allgather dispatcher, CPU shim in
tests/) and mzoo agree on mixture-of-experts checkpoints: megatron-core at EP2 loads what mzoo writes
(torch_dist written at EP1, legacy rank files written at EP2) with logits equal to transformers'
Mixtral and Qwen3-MoE (q/k norms, a dense layer from mlp_only_layers as a per-layer moe_layer_freq), mzoo converts what megatron-core writes at EP2 back to Hugging Face, and for DeepSeek
(MLA, which megatron-core can only BUILD on CPU: see mcore_ref.build_mla_model_for_names) mzoo's
names and shapes are exactly the ones megatron-core's modules declare."""

from __future__ import annotations

import dist as D
import mcore_ref as R
import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig,
                          Qwen3MoeConfig)

from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout

pytestmark = pytest.mark.dist

MIXTRAL = MixtralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
DEEPSEEK = {
    "v3": DeepseekV3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                           n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                           first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128),
    "v2-lite": DeepseekV2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
                                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                topk_method="greedy", norm_topk_prob=False, max_position_embeddings=128),
}
# layer 1 dense (mlp_only_layers), raw top-k softmax weights (norm_topk_prob false: moe_router_pre_softmax)
QWEN3_MOE = Qwen3MoeConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                           max_position_embeddings=128)
# windows of 4 over 12 tokens, sinks, biases on attention, router and experts; yarn without truncation
GPT_OSS = GptOssConfig(vocab_size=1000, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                       max_position_embeddings=128, swiglu_limit=0.5,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})
IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
PADDED = 1024


# ---- rank functions (module level: dist.run spawns them) -----------------------------------------
def _load_dist(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=1, padded_vocab=PADDED, ep=world)
    R.load_dist_checkpoint(model, path)  # Megatron-LM's default strictness
    return R.pack(R.logits(model, ids))


def _load_legacy(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=1, padded_vocab=PADDED, ep=world)
    state = torch.load(path / "release" / f"mp_rank_00_{rank:03d}" / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    return R.pack(R.logits(model, ids))


def _save_mcore(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=1, padded_vocab=PADDED, ep=world, seed=7)
    R.perturb_(model)
    args = R.megatron_args(cfg, 1, PADDED, expert_model_parallel_size=world)
    R.save_dist_checkpoint(model, path / "iter_0000002", args=args, iteration=2)
    if rank == 0:
        (path / "latest_checkpointed_iteration.txt").write_text("2")
    return R.pack(R.logits(model, ids))


def _mla_names(rank, world, cfg, tp, ep):
    """megatron-core's own names for this rank: state_dict (name -> shape or None) and the
    torch_dist keys (tensor key -> global shape, object key -> None)."""
    model = R.build_mla_model_for_names(cfg, tp=tp, padded_vocab=PADDED, ep=ep)
    local = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    keys = {k: tuple(v.shape) for k, v in R.global_tensors(model).items()}
    keys.update({info["key"]: None for info in R.sharded_keys(model).values() if info["kind"] == "object"})
    return R.pack((local, keys))


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from conftest import make_hf_model

    path = make_hf_model(tmp_path_factory.mktemp("hf") / "mixtral", MIXTRAL)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits
    return path, expected


def test_megatron_core_loads_mzoo_torch_dist_at_another_ep(mixtral, tmp_path):
    path, expected = mixtral
    out = tmp_path / "mc"
    convert(open_source(path), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=1), spelling="local")))
    cfg = open_source(out).cfg
    for logits in map(R.unpack, D.run(_load_dist, 2, cfg, out / "release", IDS)):  # written EP1, read EP2
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4


def test_megatron_core_loads_mzoo_qwen3_moe_at_another_ep(tmp_path):
    from conftest import make_moe_model

    path = make_moe_model(tmp_path / "qwen3-moe", QWEN3_MOE)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits
    out = tmp_path / "mc"
    convert(open_source(path), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=1), spelling="local")))
    (out / "mzoo.yaml").unlink()  # megatron-core is built from what the Megatron args alone say
    cfg = open_source(out).cfg
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True] and cfg.qk_layernorm
    assert cfg.architecture_differences(open_source(path).cfg) == []
    for logits in map(R.unpack, D.run(_load_dist, 2, cfg, out / "release", IDS)):  # written EP1, read EP2
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4


def test_megatron_core_loads_mzoo_legacy_expert_rank_files(mixtral, tmp_path):
    path, expected = mixtral
    out = tmp_path / "legacy"
    convert(open_source(path), out, Target("torch", MegatronCheckpoint(layout=Layout(ep=2), spelling="local")))
    cfg = open_source(out).cfg
    for logits in map(R.unpack, D.run(_load_legacy, 2, cfg, out, IDS)):
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4


def test_megatron_core_expert_checkpoint_converts_to_hf(mixtral, tmp_path):
    path, _ = mixtral
    cfg = open_source(path).cfg
    ck = tmp_path / "mcore"
    mcore_logits = R.unpack(D.run(_save_mcore, 2, cfg, ck, IDS)[0])  # megatron-core writes at EP2
    src = open_source(ck, vocab_size=1000)
    assert src.cfg.architecture_differences(cfg) == []  # read from Megatron-LM's own MoE args
    assert src.megatron.layout.ep == 2
    out = tmp_path / "hf"
    convert(src, out, Target("hf"))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
    assert (got - mcore_logits[..., :1000]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant,tp,ep", [("v3", 2, 1), ("v3", 1, 2), ("v2-lite", 2, 1)])
def test_mzoo_deepseek_names_are_megatron_cores(tmp_path, variant, tp, ep):
    """Legacy rank files (local spec) hold exactly the names and shapes of megatron-core's state
    dict on that rank (q/kv down projections split over TP, experts renumbered per EP rank,
    `_extra_state` where its linears have one); torch_dist holds exactly its sharded keys (per
    layer: the first layer is dense) with the same global shapes and _extra_state objects."""
    from conftest import make_hf_model

    if variant == "v2-lite" and R.common_in_dcp():  # make test-mcore-latest
        pytest.skip("megatron-core >= 0.17 builds MLA's direct q projection (no q_lora) from Transformer Engine "
                    "classes, placeholders without TE: it cannot build V2-Lite on CPU")

    hf = make_hf_model(tmp_path / "hf", DEEPSEEK[variant])
    cfg = open_source(hf).cfg
    legacy, dist = tmp_path / "legacy", tmp_path / "dist"
    convert(open_source(hf), legacy, Target("torch", MegatronCheckpoint(layout=Layout(tp=tp, ep=ep), spelling="local")))
    convert(open_source(hf), dist, Target("torch_dist", MegatronCheckpoint(spelling="local")))
    results = [R.unpack(r) for r in D.run(_mla_names, 2, cfg, tp, ep)]
    for rank, (mc_local, mc_keys) in enumerate(results):
        folder = f"mp_rank_{rank:02d}" if ep == 1 else f"mp_rank_00_{rank:03d}"
        state = torch.load(legacy / "release" / folder / "model_optim_rng.pt", weights_only=False)["model"]
        mine = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        assert mine == mc_local, (set(mine) ^ set(mc_local), rank)
    meta = R.dcp_metadata(dist / "release")
    mine = {k: (v[1] if v[0] == "tensor" else None) for k, v in meta.items()}
    mc_keys = {k: v for _, keys in results for k, v in keys.items()}  # each EP rank declares its experts' objects
    assert mine == mc_keys, set(mine) ^ set(mc_keys)


def test_megatron_core_loads_mzoo_gpt_oss_at_ep2(tmp_path):
    """GPT-OSS as Megatron-Bridge configures megatron-core (softmax_type learnable, window_size (w-1, 0),
    window_attn_skip_freq 2, quick_gelu clamped with glu_linear_offset 1, yarn, biased router and
    experts): megatron-core at EP2 loads mzoo's torch_dist (written at EP1) with transformers' logits."""
    from conftest import make_moe_model

    path = make_moe_model(tmp_path / "hf", GPT_OSS)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits
    out = tmp_path / "mc"
    convert(open_source(path), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=1), spelling="local")))
    cfg = open_source(out).cfg
    for logits in map(R.unpack, D.run(_load_dist, 2, cfg, out / "release", IDS)):
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4
