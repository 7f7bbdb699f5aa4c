"""Mixture-of-experts models through every Megatron format and layout: HF -> Megatron (EP x TP x PP,
both legacy expert spellings, TE and local spec) -> HF is bit-exact; experts land where Megatron
puts them; EP reshard chains are exact; bad input fails with one sentence and writes nothing;
planning DeepSeek-V3's full layout from its config is fast."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from mzoo.ckpt import dcp_meta
from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.megatron.args import args_to_config, config_to_args, moe_layer_pattern
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.ckpt.safe_pickle import load_dcp_metadata
from mzoo.config import ConfigError
from mzoo.jobs.convert import convert, plan_layout
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout
from mzoo.models.canonical import canonical_tensors
from mzoo.models.canonical import plan_tensors
from mzoo.zoo import resolve

COMMON = dict(vocab_size=1000, hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
MODELS = {
    # every layer MoE: torch_dist keys stacked [L, E, ...]
    "mixtral": MixtralConfig(**COMMON, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2,
                             num_local_experts=4, num_experts_per_tok=2),
    # V3: dense first layer (per-layer torch_dist keys), shared expert, sigmoid routing with expert_bias
    "deepseek-v3": DeepseekV3Config(**COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
                                    num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                                    num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                    v_head_dim=16),
    # V2-Lite: no q_lora (linear_q_proj), two shared experts, softmax routing
    "deepseek-v2-lite": DeepseekV2Config(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                         num_hidden_layers=4, num_key_value_heads=4, n_routed_experts=8,
                                         n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                         q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                         v_head_dim=16, topk_method="greedy", norm_topk_prob=False),
    # q/k norms, head_dim 32, no shared experts; layer 2 in mlp_only_layers (per-layer torch_dist keys)
    "qwen3-moe": Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                                num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=True, mlp_only_layers=[2]),
    # GPT-OSS: sinks, biases on attention, router and experts (stacked, gate/up interleaved), windows
    "gpt-oss": GptOssConfig(**COMMON, intermediate_size=32, num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
                            num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
}


def _grid() -> list[tuple]:
    """(format, tp, pp, ep, spec, grouped): every EP x TP x PP in torch and torch_dist; spec and the
    legacy expert spelling cycle so each (spec, spelling) pair meets every size several times."""
    out = []
    for fmt in ("torch", "torch_dist"):
        i = 0
        for ep in (1, 2, 4):
            for tp in (1, 2):
                for pp in (1, 2):
                    spec = ("te", "local")[i % 2]
                    grouped = fmt == "torch" and (i // 2) % 2 == 1
                    out.append((fmt, tp, pp, ep, spec, grouped))
                    i += 1
    return out


GRID = _grid()
SUBSET = [("torch", 2, 2, 4, "local", False), ("torch", 1, 2, 2, "te", True), ("torch_dist", 2, 1, 2, "te", False),
          ("torch_dist", 1, 2, 4, "local", False)]
ZARR = [("zarr", 2, 1, 2, "te", False), ("zarr", 1, 2, 4, "local", False)]
CASES = ([("mixtral", c) for c in GRID + ZARR] + [("deepseek-v3", c) for c in GRID + ZARR]
         + [("deepseek-v2-lite", c) for c in SUBSET + ZARR[:1]]
         + [("qwen3-moe", c) for c in SUBSET + ZARR[:1] + [("torch_dist", 2, 2, 2, "local", False)]]
         + [("gpt-oss", c) for c in [("torch", 2, 2, 2, "te", False), ("torch", 1, 2, 2, "local", True),
                                     ("torch_dist", 2, 2, 2, "te", False), ("zarr", 2, 1, 2, "local", False)]])


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same(a, b):
    before, after = _tensors(a), _tensors(b)
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _case_id(case) -> str:
    model, (fmt, tp, pp, ep, spec, grouped) = case
    return f"{model}-{fmt}-tp{tp}pp{pp}ep{ep}-{spec}{'-grouped' if grouped else ''}"


def _legacy(out, rank: str) -> dict:
    return torch.load(out / "release" / rank / "model_optim_rng.pt", weights_only=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from conftest import make_hf_model

    root = tmp_path_factory.mktemp("src")
    return {name: make_hf_model(root / name, cfg) for name, cfg in MODELS.items()}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_round_trip_is_bit_exact(sources, tmp_path, case):
    model, (fmt, tp, pp, ep, spec, grouped) = case
    mid = tmp_path / "megatron"
    convert(open_source(sources[model]), mid, Target(fmt, MegatronCheckpoint(layout=Layout(tp=tp, pp=pp, ep=ep), spelling=spec, moe_grouped_gemm=grouped)))
    back = tmp_path / "back"
    m = open_source(mid)
    assert (m.fmt, m.megatron.spelling, m.megatron.layout.ep) == (fmt, spec, ep)
    if fmt == "torch":
        assert (m.megatron.layout.tp, m.megatron.layout.pp, m.megatron.moe_grouped_gemm) == (tp, pp, grouped)
    convert(m, back, Target("hf"))
    _assert_same(sources[model], back)


def test_legacy_expert_files(sources, tmp_path):
    """mp_rank_TT_PPP_EEE; non-expert tensors repeated in every EP rank's file; each file holds its
    E/EP experts numbered from 0 (global = ep_rank * E/EP + local)."""
    out = tmp_path / "m"
    convert(open_source(sources["deepseek-v3"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2, pp=2, ep=4))))
    names = sorted(p.name for p in (out / "release").iterdir() if p.name != "tokenizer")
    assert names == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(4)]
    hf = _tensors(sources["deepseek-v3"])
    files = [_legacy(out, f"mp_rank_01_001_{e:03d}")["model"] for e in range(4)]  # TP rank 1, last stage
    for e, state in enumerate(files):
        experts = sorted({k.split("local_experts.")[1].split(".")[0] for k in state if "local_experts" in k})
        assert experts == ["0", "1"]
        # layer 3 (local 1 on stage 1): EP rank e's local expert 1 is global expert 2e + 1, TP rank 1's rows
        down = hf[f"model.layers.3.mlp.experts.{2 * e + 1}.down_proj.weight"]
        assert torch.equal(state["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"], down[:, 16:])
        assert state["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2._extra_state"] is None
        assert state["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
        for key in ("decoder.layers.1.mlp.router.weight", "decoder.layers.1.mlp.shared_experts.linear_fc1.weight",
                    "decoder.layers.1.self_attention.linear_kv_up_proj.weight"):
            assert torch.equal(state[key], files[0][key])
    args = _legacy(out, "mp_rank_00_000_000")["args"]
    assert (args.expert_model_parallel_size, args.num_experts, args.moe_layer_freq) == (4, 8, [0, 1, 1, 1])
    assert (args.multi_latent_attention, args.q_lora_rank, args.moe_shared_expert_intermediate_size) == (True, 32, 32)


def test_ambiguous_rank_folder_names(sources, tmp_path):
    """mp_rank_00_001 is pipeline stage 1 with PP=2 and EP rank 1 with EP=2; the args tell which."""
    src = open_source(sources["mixtral"])
    pp, ep = tmp_path / "pp", tmp_path / "ep"
    convert(src, pp, Target("torch", MegatronCheckpoint(layout=Layout(pp=2))))
    convert(src, ep, Target("torch", MegatronCheckpoint(layout=Layout(ep=2))))
    for out in (pp, ep):
        assert sorted(p.name for p in (out / "release").iterdir() if p.name != "tokenizer") == ["mp_rank_00_000", "mp_rank_00_001"]
    assert (open_source(pp).megatron.layout.pp, open_source(pp).megatron.layout.ep) == (2, 1)
    assert (open_source(ep).megatron.layout.pp, open_source(ep).megatron.layout.ep) == (1, 2)
    assert "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight" in _legacy(ep, "mp_rank_00_001")["model"]
    back = tmp_path / "back"
    convert(open_source(ep), back, Target("hf"))
    _assert_same(sources["mixtral"], back)


def test_grouped_expert_spelling(sources, tmp_path):
    out = tmp_path / "g"
    convert(open_source(sources["mixtral"]), out, Target("torch", MegatronCheckpoint(layout=Layout(ep=2), moe_grouped_gemm=True)))
    state = _legacy(out, "mp_rank_00_001")["model"]
    assert {"decoder.layers.0.mlp.experts.linear_fc1.weight0", "decoder.layers.0.mlp.experts.linear_fc1.weight1",
            "decoder.layers.0.mlp.experts.linear_fc2.weight1", "decoder.layers.0.mlp.experts.linear_fc1._extra_state"
            } <= set(state)
    assert not any("local_experts" in k for k in state)
    hf = _tensors(sources["mixtral"])
    assert torch.equal(state["decoder.layers.0.mlp.experts.linear_fc2.weight1"],
                       hf["model.layers.0.block_sparse_moe.experts.3.w2.weight"])


def test_dist_keys_are_megatron_cores(sources, tmp_path):
    """The keys megatron-core 0.16.1's sharded_state_dict declares (see test_megatron_core_moe for
    the check against megatron-core itself): stacked for Mixtral, per layer for DeepSeek."""
    import mcore_ref as R

    mix, ds = tmp_path / "mix", tmp_path / "ds"
    convert(open_source(sources["mixtral"]), mix, Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=2))))
    convert(open_source(sources["deepseek-v3"]), ds, Target("torch_dist", MegatronCheckpoint(spelling="local")))
    meta = R.dcp_metadata(mix / "release")
    assert meta["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == ("tensor", (2, 4, 192, 64), torch.float32)
    assert meta["decoder.layers.mlp.router.weight"][1] == (2, 4, 64)
    assert meta["decoder.layers.pre_mlp_layernorm.weight"][1] == (2, 64)  # TE spec: its own norm
    assert "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_1.3_2.4" in meta
    meta = R.dcp_metadata(ds / "release")
    assert meta["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"][1] == (8, 64, 64)
    assert meta["decoder.layers.1.mlp.router.expert_bias"] == ("tensor", (8,), torch.float32)
    assert {"decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
            "decoder.layers.3.self_attention.q_layernorm.weight", "decoder.layers.3.self_attention.kv_layernorm.weight",
            "decoder.layers.2.mlp.shared_experts.linear_fc2.weight",
            "decoder.layers.2.mlp.experts.experts.linear_fc1._extra_state/shard_7_8",
            "decoder.layers.0.self_attention.linear_q_down_proj._extra_state/shard_0_1"} <= set(meta)
    assert not any(k.startswith("decoder.layers.self_attention") for k in meta)


def test_local_spec_splits_mla_down_projections(sources, tmp_path):
    """megatron-core's local MLA spec builds linear_q/kv_down_proj as ColumnParallelLinear: rows
    split over TP in legacy files; TE keeps them whole (duplicated)."""
    hf = _tensors(sources["deepseek-v3"])
    kv = hf["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    for spec, rows in (("local", kv[20:]), ("te", kv)):
        out = tmp_path / spec
        convert(open_source(sources["deepseek-v3"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2), spelling=spec)))
        state = _legacy(out, "mp_rank_01")["model"]
        assert torch.equal(state["decoder.layers.0.self_attention.linear_kv_down_proj.weight"], rows)
        assert ("decoder.layers.0.self_attention.kv_layernorm.weight" in state) == (spec == "local")


def test_expert_bias_stays_fp32_in_bf16_checkpoints(sources, tmp_path):
    out = tmp_path / "bf16"
    convert(open_source(sources["deepseek-v3"]), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=2)), dtype=torch.bfloat16))
    src = open_source(out)
    assert src.dtype == torch.bfloat16
    assert src.get("decoder.layers.1.mlp.router.expert_bias").dtype == torch.float32
    assert src.get("decoder.layers.1.mlp.router.weight").dtype == torch.bfloat16


def test_reshard_chain_is_exact(sources, tmp_path):
    src = sources["deepseek-v3"]
    a, b, c, d, back = (tmp_path / n for n in ("a", "b", "c", "d", "back"))
    convert(open_source(src), a, Target("torch", MegatronCheckpoint(layout=Layout(tp=2, ep=4))))
    convert(open_source(a), b, Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=1), spelling="local")))
    convert(open_source(b), c, Target("torch", MegatronCheckpoint(layout=Layout(pp=2, ep=2), spelling="local", moe_grouped_gemm=True)))
    convert(open_source(c), d, Target("zarr", MegatronCheckpoint(layout=Layout(tp=2, ep=2))))
    convert(open_source(d), back, Target("hf"))
    _assert_same(src, back)


def test_config_survives_args_alone(sources, tmp_path):
    """Without mzoo.yaml the architecture comes from the Megatron args mzoo writes."""
    for model in MODELS:
        out = tmp_path / model
        cfg = open_source(sources[model]).cfg
        convert(open_source(sources[model]), out, Target("torch", MegatronCheckpoint(layout=Layout(ep=2))))
        (out / "mzoo.yaml").unlink()
        assert open_source(out).cfg.architecture_differences(cfg) == []
    for name in ("mixtral-8x7b", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "deepseek-tiny", "qwen3-30b-a3b",
                 "qwen3-moe-tiny", "qwen2.5-7b", "qwen2-tiny", "qwen3-0.6b", "qwen3-tiny", "gpt-oss-20b", "gpt-oss-tiny"):
        cfg = resolve(name)
        args = config_to_args(cfg, MegatronCheckpoint(layout=Layout(tp=2, ep=4)), torch.bfloat16)
        got = args_to_config(args)
        assert got.architecture_differences(cfg) == [], name
        assert got.family == cfg.family, name
        gpt_oss = ("softmax_type", "window_size", "window_attn_skip_freq", "activation_func_clamp_value",
                   "glu_linear_offset", "rope")  # what only the GPT-OSS args say (Megatron-Bridge's names)
        assert [getattr(got, f) for f in gpt_oss] == [getattr(cfg, f) for f in gpt_oss], name
    # Qwen3-MoE's mlp_only_layers as Megatron's per-layer moe_layer_freq list
    args = config_to_args(resolve("qwen3-moe-tiny"), MegatronCheckpoint(), torch.float32)
    assert args.moe_layer_freq == [1, 0] and args.qk_layernorm and args.kv_channels == 32
    assert vars(config_to_args(resolve("gpt-oss-20b"), MegatronCheckpoint(), torch.bfloat16))["window_size"] == (127, 0)


def test_moe_layer_freq_forms():
    assert moe_layer_pattern(1, 3) == [1, 1, 1] and moe_layer_pattern(2, 4) == [1, 0, 1, 0]
    assert moe_layer_pattern("([0]*3+[1]*2)", 5) == [0, 0, 0, 1, 1]
    assert moe_layer_pattern([0, 1, 1], 3) == [0, 1, 1]
    with pytest.raises(CheckpointError, match="lists 2 layers but num_layers is 3"):
        moe_layer_pattern([0, 1], 3)


# ---- bad input ----------------------------------------------------------------------------------
def test_ep_that_does_not_divide_experts(sources, tmp_path):
    with pytest.raises(ConfigError, match="expert parallel size 3 does not divide the 4 experts"):
        convert(open_source(sources["mixtral"]), tmp_path / "x", Target("torch", MegatronCheckpoint(layout=Layout(ep=3))))
    assert not list(tmp_path.iterdir())


def test_ep_on_a_dense_model(tmp_path, hf_factory):
    from transformers import LlamaConfig

    src = hf_factory(LlamaConfig(**COMMON, num_hidden_layers=2, intermediate_size=96))
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        convert(open_source(src), tmp_path / "x", Target("torch_dist", MegatronCheckpoint(layout=Layout(ep=2))))
    assert not (tmp_path / "x").exists()


def test_missing_expert_shard_file(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["mixtral"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2, ep=2))))
    shutil.rmtree(out / "release" / "mp_rank_01_001")
    with pytest.raises(CheckpointError) as err:
        convert(open_source(out), tmp_path / "hf", Target("hf"))
    assert "is missing mp_rank_01_001 (args say tp=2, pp=1, ep=2)" in str(err.value)
    assert str(err.value).count(". ") == 0  # one sentence
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf*"))


def test_missing_expert_tensor(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["mixtral"]), out, Target("torch", MegatronCheckpoint(layout=Layout(ep=2))))
    f = out / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    del state["model"]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]
    torch.save(state, f)
    (out / "mzoo.yaml").unlink()  # edited after mzoo.yaml vouched for it: its CRC-32 would refuse it first
    with pytest.raises(CheckpointError, match=r"mp_rank_00_001/model_optim_rng.pt has no "
                                              r"decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"):
        open_source(out)
    dist = tmp_path / "d"
    convert(open_source(sources["mixtral"]), dist, Target("torch_dist", MegatronCheckpoint()))
    meta_file = dist / "release" / ".metadata"
    meta = load_dcp_metadata(meta_file, False)
    del meta.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    meta_file.write_bytes(dcp_meta.dumps(meta))
    with pytest.raises(CheckpointError, match="has no tensor decoder.layers.mlp.experts.experts.linear_fc2.weight"):
        convert(open_source(dist), tmp_path / "hf", Target("hf"))
    assert not (tmp_path / "hf").exists()


def test_local_mla_tp_must_split_the_latent_rows():
    cfg = resolve("deepseek-tiny").replace(**{"mla.kv_lora_rank": 31})
    with pytest.raises(ConfigError, match=r"does not divide kv_lora_rank \+ qk_rope_head_dim \(39\)"):
        plan_layout(cfg, Target("torch", MegatronCheckpoint(layout=Layout(tp=2), spelling="local")))
    plan_layout(cfg, Target("torch", MegatronCheckpoint(layout=Layout(tp=2), spelling="te")))  # TE keeps them whole
    plan_layout(cfg, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2), spelling="local")))  # global tensors


# ---- planning without weights ---------------------------------------------------------------------
def test_plan_matches_what_is_written(sources, tmp_path):
    src = open_source(sources["deepseek-v3"])
    for fmt in ("torch", "torch_dist"):
        target = Target(fmt, MegatronCheckpoint(layout=Layout(tp=2, pp=2, ep=2), spelling="local", iteration="release"), torch.float32)
        plan = plan_layout(src.cfg, target)
        out = tmp_path / fmt
        convert(src, out, target)
        if fmt == "torch":
            assert len(plan.files) == 8
            for f in plan.files:
                state = torch.load(out / f.path, weights_only=False)["model"]
                tensors = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
                assert tensors == {e.key: e.shape for e in f.entries}, f.path
        else:
            import mcore_ref as R

            meta = R.dcp_metadata(out / plan.files[0].path)
            assert {k: v[1] for k, v in meta.items() if v[0] == "tensor"} == {e.key: e.shape for e in plan.files[0].entries}


def test_planning_deepseek_v3_is_fast():
    cfg = resolve("deepseek-v3")
    start = time.perf_counter()
    tensors = plan_tensors(cfg)
    lay = MegatronCheckpoint(layout=Layout(tp=2, pp=16, ep=64, first_stage_layers=3, last_stage_layers=2),
                             iteration="release")
    plan = plan_layout(cfg, Target("torch", lay, torch.bfloat16), tensors)
    dist = plan_layout(cfg, Target("torch_dist", lay, torch.bfloat16), tensors)
    assert time.perf_counter() - start < 10
    assert len(plan.files) == 2 * 16 * 64
    assert plan.files[-1].path == "release/mp_rank_01_015_063/model_optim_rng.pt"
    keys = {e.key: e.shape for e in plan.files[-1].entries}
    assert keys["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"] == (2048, 7168)  # [gate; up] / TP
    assert keys["decoder.layers.1.mlp.router.weight"] == (256, 7168)
    assert "decoder.layers.1.mlp.experts.local_experts.4.linear_fc1.weight" not in keys  # 256 / 64 = 4 per rank
    shapes = {e.key: e.shape for e in dist.files[0].entries}
    assert shapes["decoder.layers.60.mlp.experts.experts.linear_fc1.weight"] == (256, 4096, 7168)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (36864, 7168)
    assert 1.3e12 < dist.nbytes < 1.4e12  # 671B parameters in bf16


def test_plan_tensors_equal_canonical_tensors():
    for name in ("mixtral-tiny", "deepseek-tiny"):
        cfg = resolve(name)
        assert plan_tensors(cfg) == canonical_tensors(cfg)
        cfg = cfg.replace(num_layers=7, **{"moe.first_k_dense": 2, "moe.layer_freq": 2})
        assert plan_tensors(cfg) == canonical_tensors(cfg)


# ---- command line ---------------------------------------------------------------------------------
def _mzoo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mzoo.cli.main", *map(str, args)], capture_output=True, text=True,
                          check=True)


def test_cli_ep_plan_and_inspect(sources, tmp_path):
    mc, mc2 = tmp_path / "mc", tmp_path / "mc2"
    plan = json.loads(_mzoo("convert", "hf->megatron", sources["mixtral"], mc, "--ep", "2", "--tp", "2",
                            "--megatron-format", "torch", "--plan", "--json").stdout)
    assert plan["ep"] == 2 and len(plan["files"]) == 4 and not mc.exists()
    summary = json.loads(_mzoo("convert", "hf->megatron", sources["mixtral"], mc, "--ep", "2", "--tp", "2",
                               "--megatron-format", "torch", "--json").stdout)
    assert summary["ep"] == 2
    info = json.loads(_mzoo("inspect", mc, "--json").stdout)
    assert (info["format"], info["tp"], info["ep"]) == ("torch", 2, 2)
    _mzoo("reshard", mc, mc2, "--ep", "4", "--moe-grouped-gemm", "--megatron-format", "torch")
    assert json.loads(_mzoo("inspect", mc2, "--json").stdout)["ep"] == 4
    assert "ep=4" in _mzoo("inspect", mc2).stdout


def test_cli_plans_deepseek_v3_from_the_preset_alone(tmp_path):
    """`mzoo convert --plan` takes a zoo preset (no weights) and lays out DeepSeek-V3 at tp2 x pp16 x
    ep64 in seconds; without stage sizes it says which to set."""
    import json
    import subprocess
    import sys
    import time

    def mzoo(*args):
        return subprocess.run([sys.executable, "-m", "mzoo.cli.main", *args], capture_output=True, text=True)

    start = time.perf_counter()
    proc = mzoo("convert", "hf->megatron", "deepseek-v3", str(tmp_path / "out"), "--tp", "2", "--pp", "16",
                "--ep", "64", "--first-stage-layers", "2", "--last-stage-layers", "3", "--megatron-format", "torch",
                "--plan", "--json")
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 30
    plan = json.loads(proc.stdout)
    assert len(plan["files"]) == 2 * 16 * 64 and not (tmp_path / "out").exists()
    proc = mzoo("convert", "hf->megatron", "deepseek-v3", str(tmp_path / "out"), "--tp", "2", "--pp", "16",
                "--ep", "64", "--plan")
    assert proc.returncode == 2 and "--first-stage-layers 2 --last-stage-layers 3" in proc.stderr
