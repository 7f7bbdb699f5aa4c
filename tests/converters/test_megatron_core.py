"""Real megatron-core (0.16.1, local spec, CPU shim in tests/) reads what mzoo writes, and mzoo
reads what megatron-core writes; logits are held to transformers' own (LLaMA, and Qwen2 / Qwen3:
q/k/v biases without add_bias_linear, qk_layernorm, kv_channels from the args mzoo writes)."""

from __future__ import annotations

import dist as D
import mcore_ref as R
import pytest
import torch
from conftest import all_safetensors, make_hf_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout

pytestmark = pytest.mark.dist

HF_CONFIG = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128)
QWEN = {  # Qwen2: q/k/v biases, no o bias, tied; Qwen3: per-head q/k norms, head_dim 32 (not 64 / 4)
    "qwen2": Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128,
                         tie_word_embeddings=True),
    "qwen3": Qwen3Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=160, max_position_embeddings=128),
}
IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
PADDED = 1024  # 1000 padded to a multiple of 128 (x TP 1 or 2)


def _load_dist(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED)
    R.load_dist_checkpoint(model, path)  # Megatron-LM's default strictness
    return R.pack(R.logits(model, ids))


def _rank_file(path, rank) -> dict:
    file = path / "release" / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    return torch.load(file, weights_only=False)


def _norms(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("layernorm.weight")}


def _load_legacy(rank, world, cfg, local, te, ids):
    """A local-spec model (Megatron-LM without Transformer Engine) loads the local-spelled rank file
    strictly; the TE-spelled one goes the way Megatron-LM's load_model_state_dict takes it: strict
    fails, the non-strict fallback loads the rest and leaves every norm at megatron's init."""
    model = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED)
    state = _rank_file(local, rank)
    model.load_state_dict(state["model"], strict=True)
    fresh, te_state = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED), _rank_file(te, rank)
    try:
        fresh.load_state_dict(te_state["model"], strict=True)
        error = None
    except RuntimeError as e:
        error = str(e)
        fresh.load_state_dict(te_state["model"], strict=False)
    return R.pack(dict(logits=R.logits(model, ids), norms=_norms(model), impl=state["args"].transformer_impl,
                       te_impl=te_state["args"].transformer_impl, te_error=error, te_norms=_norms(fresh)))


def _save_mcore(rank, world, cfg, path, ids):
    model = R.build_gpt_model(cfg, tp=world, padded_vocab=PADDED)
    R.perturb_(model)
    args = R.megatron_args(cfg, world, PADDED)
    R.save_dist_checkpoint(model, path / "iter_0000003", args=args, iteration=3)
    if rank == 0:
        (path / "latest_checkpointed_iteration.txt").write_text("3")
    return R.pack(R.logits(model, ids))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = make_hf_model(tmp_path_factory.mktemp("hf") / "llama", HF_CONFIG)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits
    return path, expected


def test_megatron_core_loads_mzoo_torch_dist_at_another_tp(hf, tmp_path):
    path, expected = hf
    out = tmp_path / "mc"
    convert(open_source(path), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=1), spelling="local")))
    cfg = open_source(out).cfg
    for logits in map(R.unpack, D.run(_load_dist, 2, cfg, out / "release", IDS)):  # written TP1, read TP2
        assert (logits[..., :1000] - expected).abs().max().item() <= 1e-4


def _load_each(rank, world, cases, ids):
    return [_load_dist(rank, world, cfg, path, ids) for cfg, path in cases]


def test_megatron_core_loads_mzoo_qwen_at_another_tp(tmp_path):
    """Qwen2 and Qwen3 in one launch: written TP1 by mzoo, megatron-core built at TP2 from the
    Megatron args alone (no mzoo.yaml), logits equal to transformers'."""
    cases, expected = [], []
    for family, config in QWEN.items():
        path = make_hf_model(tmp_path / family, config)
        with torch.no_grad():
            expected.append(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(IDS).logits)
        out = tmp_path / f"{family}-mc"
        convert(open_source(path), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=1), spelling="local")))
        (out / "mzoo.yaml").unlink()
        cfg = open_source(out).cfg
        assert (cfg.add_qkv_bias, cfg.add_bias_linear, cfg.qk_layernorm) == (family == "qwen2", False,
                                                                             family == "qwen3")
        assert cfg.kv_channels == (32 if family == "qwen3" else 16) and cfg.family == family
        cases.append((cfg, out / "release"))
    for per_rank in D.run(_load_each, 2, cases, IDS):
        for packed, want in zip(per_rank, expected):
            assert (R.unpack(packed)[..., :1000] - want).abs().max().item() <= 1e-4


def test_megatron_core_loads_mzoo_legacy_rank_files(hf, tmp_path):
    """`--spec local` rank files load strictly into megatron-core's local spec with every norm the
    source's (non-unit) values, and say `transformer_impl='local'` in their args. The default (TE)
    spelling fuses the norms into linear_qkv / linear_fc1 (`layer_norm_weight`), which the local
    spec does not have: Megatron-LM run without Transformer Engine falls back to a non-strict load
    and every norm is 1.0. Its args say `transformer_impl='transformer_engine'`."""
    path, expected = hf
    local, te = tmp_path / "legacy", tmp_path / "legacy-te"
    convert(open_source(path), local, Target("torch", MegatronCheckpoint(layout=Layout(tp=2), spelling="local")))
    convert(open_source(path), te, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    cfg = open_source(local).cfg
    hf_tensors = all_safetensors(path)
    hf_names = {"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "post_attention_layernorm"}
    source = {f"decoder.layers.{i}.{mine}.weight": hf_tensors[f"model.layers.{i}.{theirs}.weight"]
              for i in range(cfg.num_layers) for mine, theirs in hf_names.items()}
    source["decoder.final_layernorm.weight"] = hf_tensors["model.norm.weight"]
    assert all((v != 1).all() for v in source.values())  # informative: a norm reset to 1 shows
    for r in map(R.unpack, D.run(_load_legacy, 2, cfg, local, te, IDS)):
        assert (r["logits"][..., :1000] - expected).abs().max().item() <= 1e-4
        assert r["norms"].keys() == source.keys() and r["impl"] == "local"
        for name, value in source.items():
            assert torch.equal(r["norms"][name], value), name
        assert r["te_impl"] == "transformer_engine"
        error = r["te_error"] or ""  # missing the local norms, unexpected the TE ones
        assert "input_layernorm.weight" in error and "linear_qkv.layer_norm_weight" in error
        assert all(torch.equal(v, torch.ones_like(v)) for k, v in r["te_norms"].items() if "layers" in k)


def test_megatron_core_checkpoint_converts_to_hf(hf, tmp_path):
    path, _ = hf
    cfg = open_source(path).cfg
    ck = tmp_path / "mcore"
    mcore_logits = R.unpack(D.run(_save_mcore, 2, cfg, ck, IDS)[0])  # megatron-core writes at TP2
    out = tmp_path / "hf"
    convert(open_source(ck, vocab_size=1000), out, Target("hf"))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(IDS).logits
    assert (got - mcore_logits[..., :1000]).abs().max().item() <= 1e-4
