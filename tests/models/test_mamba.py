"""Mamba-1, Mamba-2 and Megatron hybrid (NemotronH) models against transformers' own models through the
adapters (fp32, max |Δlogits| <= 1e-4); TP2 and TP2 + sequence parallel on real gloo ranks against one
process (logits 1e-5, mixer grads 1e-6); loss curves under TP2 and PP2 against one process (1e-5 over
20 steps); prefill + decode with an inference cache against the full forward; Mamba's initial values."""

from __future__ import annotations

from pathlib import Path

import dist as D
import pytest
import torch
import torch.nn.functional as F
from informative import perturb_model_
from transformers import AutoModelForCausalLM, Mamba2Config, MambaConfig, NemotronHConfig

from mzoo.config import ModelConfig
from mzoo.converters.hf import load_hf_model
from mzoo.layout import Layout
from mzoo.models import build_chunks, build_model
from mzoo.parallel.sharding import get_spec
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer

VOCAB, SEQ = 160, 20

MAMBA1 = {
    "d16-e2": dict(hidden_size=32, state_size=16),
    "d4-e1-rank3-k2": dict(hidden_size=48, state_size=4, expand=1, time_step_rank=3, conv_kernel=2),
    "biases-untied": dict(hidden_size=32, state_size=8, use_bias=True, use_conv_bias=False, tie_word_embeddings=False),
}
MAMBA2 = {  # SEQ = 20: chunk 8 leaves a partial chunk, chunk 4 divides it, chunk 64 is longer than it
    "g1-chunk8": dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=1, state_size=8, chunk_size=8),
    "g2-chunk4-d16": dict(hidden_size=32, num_heads=8, head_dim=8, n_groups=2, state_size=16, chunk_size=4),
    "g2-e1-chunk64": dict(hidden_size=64, expand=1, num_heads=4, head_dim=16, n_groups=2, state_size=8,
                          chunk_size=64),
    "g4-biases-tied": dict(hidden_size=32, num_heads=8, head_dim=8, n_groups=4, state_size=8, chunk_size=6,
                           use_bias=True, use_conv_bias=False, tie_word_embeddings=True),
}
HYBRID = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
              ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, chunk_size=8,
              initializer_range=0.1)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24)
NEMOTRON_H = {
    "M*-M": dict(HYBRID, layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"]),
    "M*EM-moe": dict(HYBRID, **MOE, layers_block_type=["linear_attention", "full_attention", "moe", "linear_attention"],
                     routed_scaling_factor=2.0),
    "*M-E-grouped-gelu": dict(HYBRID, **MOE, n_group=2, topk_group=1, mlp_hidden_act="gelu", n_groups=4,
                              layers_block_type=["full_attention", "linear_attention", "mlp", "moe"]),
}


def save_hf_model(path: Path, config, seed: int = 0) -> Path:
    """transformers' own random model with every 1-D tensor perturbed, routers making clear choices and
    dt_bias in [-2, 1]: softplus(dt) stays far above NemotronH's time_step_min clamp, which Megatron and
    mzoo do not apply (docs/mamba.md)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                p.uniform_(-2.0, 1.0)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


def _compare(path: Path) -> float:
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg, ours = load_hf_model(path)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(ids).logits, ours.eval()(ids)
    assert got.shape == expected.shape and expected.std() > 0.1  # an informative model
    diff = (expected - got).abs().max().item()
    assert diff <= 1e-4, diff
    return diff


@pytest.mark.parametrize("case", MAMBA1)
def test_mamba1_matches_transformers(tmp_path, case):
    _compare(save_hf_model(tmp_path, MambaConfig(vocab_size=VOCAB, num_hidden_layers=2, **MAMBA1[case])))


@pytest.mark.parametrize("case", MAMBA2)
def test_mamba2_matches_transformers(tmp_path, case):
    _compare(save_hf_model(tmp_path, Mamba2Config(vocab_size=VOCAB, num_hidden_layers=2, **MAMBA2[case])))


@pytest.mark.parametrize("case", NEMOTRON_H)
def test_nemotron_h_matches_transformers(tmp_path, case):
    _compare(save_hf_model(tmp_path, NemotronHConfig(vocab_size=VOCAB, **NEMOTRON_H[case])))


# ---- tensor parallelism ------------------------------------------------------------------------------
def tiny(name: str) -> ModelConfig:
    from mzoo.zoo import resolve

    if name == "hybrid-moe":  # every layer kind, experts included
        return resolve("mamba-hybrid-tiny").replace(**{
            "vocab_size": VOCAB, "ssm.hybrid_pattern": "M*E-",
            "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32, "num_shared_experts": 1,
                    "score_function": "sigmoid", "expert_bias": True}})
    return resolve(name).replace(vocab_size=VOCAB)


def _sharded(rank, world, name, sequence_parallel):
    torch.manual_seed(0)
    cfg = tiny(name)
    ids = torch.randint(0, VOCAB, (2, 16))
    ref = build_model(cfg)
    ref.init_weights(seed=3)
    perturb_model_(ref, seed=3)  # norms (the mixer's is split over TP), D, biases off 1 and 0
    expected = ref(ids)
    expected.square().mean().backward()
    state = ParallelState.build(Layout(tp=world, sequence_parallel=sequence_parallel))
    model = build_model(cfg, state)
    model.init_weights(seed=3)  # same seed, same global model, this rank's shards
    perturb_model_(model, seed=3)
    got = model(ids)
    got.square().mean().backward()
    ref_params = dict(ref.canonical_parameters())
    worst, checked = 0.0, 0
    for cname, p in model.canonical_parameters():
        if ".mixer." in cname:  # every mixer tensor's grad is this rank's shard of the reference grad
            spec, grad = get_spec(p), p.grad
            if sequence_parallel and getattr(p, "sequence_parallel", False):  # the norm's: partial per shard
                grad = grad.clone()
                torch.distributed.all_reduce(grad, group=state.tp_group)
            expect = ref_params[cname].grad
            expect = spec.shard(expect, state.tp_rank, world) if spec.axis == "tp" else expect
            worst, checked = max(worst, (grad - expect).abs().max().item()), checked + 1
    assert checked >= 8
    return (got - expected).abs().max().item(), worst


@pytest.mark.dist
@pytest.mark.parametrize("name", ["mamba-tiny", "mamba1-tiny", "mamba-hybrid-tiny", "hybrid-moe"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp2_matches_single_process(name, sp):
    for logits_diff, grad_diff in D.run(_sharded, 2, name, sp):
        assert logits_diff <= 1e-5
        assert grad_diff <= 1e-6


# ---- training across layouts -------------------------------------------------------------------------
STEPS = 20


def counting_sampler(vocab: int, seq_len: int):
    """Learnable data: runs of consecutive ids from a per-sample random start."""

    def sample(index: int) -> dict[str, torch.Tensor]:
        start = int(torch.randint(0, vocab, (1,), generator=torch.Generator().manual_seed(index)))
        ids = (torch.arange(seq_len + 1) * 3 + start) % vocab
        return {"tokens": ids[:-1], "labels": ids[1:]}

    return sample


def _train(cfg: ModelConfig, state: ParallelState, steps: int = STEPS, recompute: str = "none") -> list[float]:
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=steps, lr=3e-3, min_lr=3e-4, warmup=2,
                       recompute=recompute)
    model = build_chunks(cfg, state)
    model.init_weights(seed=5)
    return [log.loss for log in Trainer(model, cfg, state, tcfg, counting_sampler(cfg.vocab_size, 16)).train()]


def _train_worker(rank, world, name, layout):
    torch.manual_seed(0)
    return _train(tiny(name), ParallelState.build(Layout(**layout)))


@pytest.mark.dist
@pytest.mark.parametrize("name", ["mamba-tiny", "mamba-hybrid-tiny"])
@pytest.mark.parametrize("layout", [dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2)],
                         ids=["tp2", "tp2-sp", "pp2"])
def test_loss_curve_matches_single_process(name, layout):
    torch.set_num_threads(1)
    expected = _train(tiny(name), ParallelState.single())
    assert expected[-1] < expected[0] - 0.3
    for losses in D.run(_train_worker, 2, name, layout):
        assert len(losses) == STEPS
        assert max(abs(a - b) for a, b in zip(losses, expected)) <= 1e-5, (losses, expected)


def test_full_recompute_gives_identical_training():
    cfg = tiny("mamba-hybrid-tiny")
    single = ParallelState.single()
    assert _train(cfg, single, steps=4, recompute="full") == _train(cfg, single, steps=4)
    assert _train(cfg, single, steps=4, recompute="selective") == _train(cfg, single, steps=4)


# ---- inference cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba1-tiny", "mamba-tiny", "mamba-hybrid-tiny"])
def test_prefill_and_decode_match_the_full_forward(name):
    from mzoo.generate import InferenceCache

    cfg = tiny(name)
    model = build_model(cfg).eval()
    model.init_weights(seed=2)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    cache = InferenceCache()
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :9], cache=cache), model(ids[:, 9:12], cache=cache)]
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 19)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


# ---- initial values ----------------------------------------------------------------------------------
def test_init_follows_mamba():
    for name in ("mamba1-tiny", "mamba-tiny"):
        cfg = tiny(name)
        model = build_model(cfg)
        model.init_weights(seed=1)
        mixer = model.decoder.layers[0].mixer
        A = torch.exp(mixer.A_log)
        dt_bias = mixer.dt_proj.bias if cfg.ssm.version == 1 else mixer.dt_bias
        dt = F.softplus(dt_bias)
        if cfg.ssm.version == 1:  # S4D-real: A = 1..N in every channel
            assert torch.allclose(A, torch.arange(1.0, cfg.ssm.d_state + 1).expand_as(A), atol=1e-5)
        else:
            assert A.min() >= 1.0 and A.max() <= 16.0
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        assert mixer.conv1d.weight.abs().max() <= cfg.ssm.d_conv ** -0.5
        assert torch.equal(mixer.in_proj.layer_norm_weight, torch.ones_like(mixer.in_proj.layer_norm_weight))
