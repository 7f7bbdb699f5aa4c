"""The megatron-core CPU harness (tests/mcore_ref.py + tests/megatron_shim.py) works on its own.

Everything here is the REAL megatron-core 0.16.1 (local spec, fp32, CPU, gloo); only the few
torch.cuda calls are shimmed. What these tests established (and keep asserting):

torch_dist checkpoint megatron-core 0.16.1 writes for the tiny LLaMA-style model (vocab 1000
padded to 1024, hidden 64, 2 layers, 4 heads, 2 query groups, head_dim 16, ffn 160, swiglu,
RMSNorm, rope, untied, no biases) at TP=1 -- `FileSystemReader(path).read_metadata()`:

    embedding.word_embeddings.weight                            tensor [1024, 64]   fp32
    decoder.layers.self_attention.linear_qkv.layer_norm_weight  tensor [2, 64]
    decoder.layers.self_attention.linear_qkv.weight             tensor [2, 128, 64]
    decoder.layers.self_attention.linear_proj.weight            tensor [2, 64, 64]
    decoder.layers.mlp.linear_fc1.layer_norm_weight             tensor [2, 64]
    decoder.layers.mlp.linear_fc1.weight                        tensor [2, 320, 64]
    decoder.layers.mlp.linear_fc2.weight                        tensor [2, 64, 160]
    decoder.final_layernorm.weight                              tensor [64]
    output_layer.weight                                         tensor [1024, 64]
    decoder.layers.self_attention.linear_qkv._extra_state/shard_{0,1}_2   bytes: torch.save([None])
    decoder.layers.self_attention.linear_proj._extra_state/shard_{0,1}_2  bytes
    decoder.layers.mlp.linear_fc1._extra_state/shard_{0,1}_2              bytes
    decoder.layers.mlp.linear_fc2._extra_state/shard_{0,1}_2              bytes

- Layer stacks are stored stacked (leading [L] axis) under `decoder.layers.<name>` and the
  local-spec norms are written under their TE names (input_layernorm -> linear_qkv.layer_norm_*,
  pre_mlp_layernorm -> linear_fc1.layer_norm_*); keys are the same at TP=2 (layout-independent
  global tensors). No `output_layer._extra_state` key: the output layer's extra state is not
  part of megatron's sharded state dict. Tied embeddings: no `output_layer.weight` key at all.
- The global linear_qkv is Megatron's canonical per-group layout [q_g (heads/groups * d);
  k_g (d); v_g (d)] for g in groups, and the gated linear_fc1 is [gate_all; up_all]: checked by
  an independent plain-torch forward from the stored tensors that reproduces megatron's logits,
  and by the TP=2 save storing bit-identical global tensors.
- Files: `__0_0.distcp __0_1.distcp .metadata common.pt metadata.json` (TP=1; TP=2 adds
  `__1_*.distcp`). metadata.json = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
  "common_backend": "torch", "common_backend_version": 1}. common.pt (torch.save, needs
  weights_only=False because of argparse.Namespace) holds everything that is not a
  ShardedTensor/ShardedObject: here {"checkpoint_version": 3.0, "iteration": 7, "args":
  Namespace(...), "content_metadata": {"singleton_local_shards": False,
  "chained_optim_avoid_prefix": True}}.
- A checkpoint holding ONLY plain global tensors under those keys (plain
  torch.distributed.checkpoint.save, no `_extra_state`, plus metadata.json and common.pt) does NOT
  load at megatron's default strictness (dist_checkpointing.load strict="assume_ok_unexpected",
  Megatron-LM's default --dist-ckpt-strictness): DCP raises "Missing key in checkpoint state_dict:
  decoder.layers.self_attention.linear_proj._extra_state/shard_0_2". It loads (same logits, TP=2)
  with strict="log_unexpected" plus a non-strict module load_state_dict (missing keys: only the
  `_extra_state` entries; Megatron-LM's load_model_state_dict falls back to strict=False itself).
  Adding the objects with plain DCP -- `dcp.save({..., "<key>._extra_state/shard_<i>_<L>": [None]})`,
  which stores exactly megatron's record torch.save([None]) -- gives the same inventory as
  megatron's own save, and it loads with the defaults and a strict module load, at TP=1 and TP=2,
  and with an unpadded 1000-row vocabulary (megatron fills the overlapping rows, zeros the rest).

Legacy "torch"-format state dict of the same GPTModel (model.state_dict(), TP=1), local names:
`embedding.word_embeddings.weight [1024, 64]`, per layer i `decoder.layers.{i}.input_layernorm.weight
[64]`, `.self_attention.linear_qkv.weight [128, 64]`, `.self_attention.linear_qkv._extra_state`,
`.self_attention.linear_proj.weight [64, 64]`, `.self_attention.linear_proj._extra_state`,
`.pre_mlp_layernorm.weight [64]`, `.mlp.linear_fc1.weight [320, 64]`, `.mlp.linear_fc1._extra_state`,
`.mlp.linear_fc2.weight [64, 160]`, `.mlp.linear_fc2._extra_state`; `decoder.final_layernorm.weight
[64]`, `output_layer.weight [1024, 64]`, `output_layer._extra_state` (also present, without a
weight, when embeddings are tied). Every `_extra_state` value is None; a strict
load_state_dict requires the keys (the linears define set_extra_state). At TP=2 rank r holds
contiguous dim-0 chunks of the global qkv / embedding / output layer, [gate_r; up_r] for the
gated fc1, and dim-1 halves of linear_proj / linear_fc2.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException

import dist as D
import mcore_ref as R
from mzoo.config import ModelConfig, RopeConfig

# find_spec, not importorskip: the pytest process itself never imports megatron (only the ranks do)
for _needed in ("megatron.core", "psutil"):  # psutil: undeclared megatron-core dependency, saves hang without it
    if importlib.util.find_spec(_needed) is None:
        pytest.skip(f"{_needed} is not installed (pip install -e '.[test]')", allow_module_level=True)

VOCAB, PADDED = 1000, 1024
LLAMA = ModelConfig(
    name="tiny-llama", family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=2,
    num_attention_heads=4, num_query_groups=2, ffn_hidden_size=160, activation="swiglu",
    normalization="rmsnorm", norm_eps=1e-5, position_embedding="rope", max_position_embeddings=64,
    rope=RopeConfig(theta=500000.0), tie_embeddings=False, add_bias_linear=False,
)
GPT2 = ModelConfig(
    name="tiny-gpt2", family="gpt", vocab_size=VOCAB, hidden_size=64, num_layers=2,
    num_attention_heads=4, ffn_hidden_size=256, activation="gelu_tanh", normalization="layernorm",
    norm_eps=1e-5, position_embedding="learned", max_position_embeddings=64, tie_embeddings=True,
    add_bias_linear=True, add_qkv_bias=True,
)
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

LLAMA_DCP_KEYS = {
    "embedding.word_embeddings.weight": (1024, 64),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (2, 64),
    "decoder.layers.self_attention.linear_qkv.weight": (2, 128, 64),
    "decoder.layers.self_attention.linear_proj.weight": (2, 64, 64),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 64),
    "decoder.layers.mlp.linear_fc1.weight": (2, 320, 64),
    "decoder.layers.mlp.linear_fc2.weight": (2, 64, 160),
    "decoder.final_layernorm.weight": (64,),
    "output_layer.weight": (1024, 64),
}
LLAMA_DCP_OBJECTS = {
    f"decoder.layers.{m}._extra_state/shard_{i}_2"
    for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    for i in range(2)
}


# ---- an independent plain-torch forward from the global checkpoint tensors -----------------------
def reference_logits(cfg: ModelConfig, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V_padded] computed from torch_dist global tensors ASSUMING Megatron's
    canonical layouts: linear_qkv rows grouped per query group [q_g; k_g; v_g], gated fc1 rows
    [gate; up], rotate-half RoPE. Shares no code with megatron or mzoo."""
    b, s = ids.shape
    heads, groups, d = cfg.num_attention_heads, cfg.groups, cfg.kv_channels
    L = "decoder.layers."

    def norm(x, w, bias):
        if cfg.normalization == "rmsnorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
        return F.layer_norm(x, (x.shape[-1],), w, bias, cfg.norm_eps)

    def get(name, i=None):
        v = t.get(name)
        return v if v is None or i is None else v[i]

    x = t["embedding.word_embeddings.weight"][ids]  # [b, s, h]
    if cfg.position_embedding == "learned":
        x = x + t["embedding.position_embeddings.weight"][:s]
    if cfg.position_embedding == "rope":
        inv = 1.0 / cfg.rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], -1)  # [s, d]
        cos, sin = emb.cos(), emb.sin()

        def rope(u):  # [b, n, s, d]
            u1, u2 = u.chunk(2, -1)
            return u * cos + torch.cat([-u2, u1], -1) * sin

    act = {"swiglu": F.silu, "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "gelu": F.gelu}[cfg.activation]
    for i in range(cfg.num_layers):
        h = norm(x, get(L + "self_attention.linear_qkv.layer_norm_weight", i),
                 get(L + "self_attention.linear_qkv.layer_norm_bias", i))
        qkv = F.linear(h, get(L + "self_attention.linear_qkv.weight", i), get(L + "self_attention.linear_qkv.bias", i))
        qkv = qkv.view(b, s, groups, heads // groups + 2, d)
        q = qkv[:, :, :, : heads // groups].reshape(b, s, heads, d).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2)
        v = qkv[:, :, :, -1].transpose(1, 2)
        if cfg.position_embedding == "rope":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, heads * d)
        x = x + F.linear(o, get(L + "self_attention.linear_proj.weight", i), get(L + "self_attention.linear_proj.bias", i))
        h = norm(x, get(L + "mlp.linear_fc1.layer_norm_weight", i), get(L + "mlp.linear_fc1.layer_norm_bias", i))
        h = F.linear(h, get(L + "mlp.linear_fc1.weight", i), get(L + "mlp.linear_fc1.bias", i))
        if cfg.gated:
            gate, up = h.chunk(2, -1)
            h = act(gate) * up
        else:
            h = act(h)
        x = x + F.linear(h, get(L + "mlp.linear_fc2.weight", i), get(L + "mlp.linear_fc2.bias", i))
    x = norm(x, t["decoder.final_layernorm.weight"], t.get("decoder.final_layernorm.bias"))
    out_w = t["embedding.word_embeddings.weight"] if cfg.tie_embeddings else t["output_layer.weight"]
    return x @ out_w.t()


# ---- functions launched on gloo ranks (module level: they are pickled by spawn) -------------------
def _save_tp1(rank, world, cfg, path, ids):
    """Build a perturbed TP=1 model, save it with megatron-core, report what it holds."""
    model = R.build_gpt_model(cfg, 1, PADDED, seed=11)
    R.perturb_(model, seed=1)
    out = R.logits(model, ids)
    R.save_dist_checkpoint(model, path, args=R.megatron_args(cfg, 1, PADDED), iteration=7)
    from megatron.core.transformer.utils import openai_gelu  # Megatron-LM --openai-gelu

    x = torch.linspace(-8, 8, 4001)
    gelu_new = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    return R.pack(dict(
        openai_gelu_vs_gelu_new=float((openai_gelu(x) - gelu_new).abs().max()),
        openai_gelu_vs_torch_tanh=float((openai_gelu(x) - F.gelu(x, approximate="tanh")).abs().max()),
        model_activation=model.config.activation_func.__name__,
        logits=out,
        state_dict=R.local_state_dict(model),
        sharded_keys=R.sharded_keys(model),
        tensors=R.global_tensors(model),
    ))


def _load(rank, world, cfg, path, ids, padded, resave_path=None, strict=True, dist_strictness="assume_ok_unexpected"):
    """A fresh, differently seeded model at TP=world loads `path` with megatron-core."""
    model = R.build_gpt_model(cfg, world, padded, seed=99 + rank)
    common = R.load_dist_checkpoint(model, path, strict=strict, dist_strictness=dist_strictness)
    out = R.logits(model, ids)
    tensors = R.global_tensors(model)
    if resave_path is not None:
        R.save_dist_checkpoint(model, resave_path, args=R.megatron_args(cfg, world, padded), iteration=8)
    common.pop("args", None)
    # the model _save_tp1 built, built again at this TP from the same seed (CPU init is global)
    same_seed = R.build_gpt_model(cfg, world, padded, seed=11)
    R.perturb_(same_seed, seed=1)
    same_seed_tensors = R.global_tensors(same_seed)
    return R.pack(dict(
        logits=out, common=common, state_dict=R.local_state_dict(model),
        tensors=tensors if rank == 0 else None, same_seed_tensors=same_seed_tensors if rank == 0 else None,
    ))


def _load_default_then_lenient(rank, world, cfg, path, ids, padded):
    """Megatron's default strictness on a checkpoint without _extra_state (expected to fail),
    then Megatron-LM's lenient route (--dist-ckpt-strictness log_unexpected, non-strict module load)."""
    model = R.build_gpt_model(cfg, world, padded, seed=99 + rank)
    try:
        R.load_dist_checkpoint(model, path)
        error = None
    except CheckpointException as e:  # a BaseException; DCP raises it on every rank alike
        error = f"{type(e).__name__}: {e}"
    common = R.load_dist_checkpoint(model, path, strict=False, dist_strictness="log_unexpected")
    return R.pack(dict(error=error, logits=R.logits(model, ids), common=common))


def _roundtrip(cfg, tmp_path):
    ck1, ck2 = tmp_path / "tp1", tmp_path / "tp2"
    saved = R.unpack(D.run(_save_tp1, 1, cfg, ck1, IDS)[0])
    loaded = [R.unpack(r) for r in D.run(_load, 2, cfg, ck1, IDS, PADDED, ck2)]
    return saved, loaded, ck1, ck2


def _check_roundtrip(cfg, saved, loaded, ck1, ck2):
    # the TP=2 model loaded from the TP=1 checkpoint gives the same logits on every rank
    for r in loaded:
        assert r["logits"].shape == (2, 12, PADDED)
        torch.testing.assert_close(r["logits"], saved["logits"], atol=1e-5, rtol=0)
        assert r["common"]["iteration"] == 7 and r["common"]["checkpoint_version"] == 3.0
        assert r["common"]["content_metadata"] == R.CONTENT_METADATA
        assert r["common"]["_incompatible_keys"] == ([], [])
    # an independent forward that assumes the canonical layouts reproduces megatron's logits
    ref = reference_logits(cfg, R.read_dcp_tensors(ck1), IDS)
    torch.testing.assert_close(ref, saved["logits"], atol=1e-5, rtol=0)
    # global tensors are layout-independent: the TP=2 save stores exactly the TP=1 tensors
    t1, t2 = R.read_dcp_tensors(ck1), R.read_dcp_tensors(ck2)
    assert t1.keys() == t2.keys() == saved["tensors"].keys() == loaded[0]["tensors"].keys()
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k
        assert torch.equal(t1[k], saved["tensors"][k]), k
        assert torch.equal(t1[k], loaded[0]["tensors"][k]), k
    # CPU initialisation draws global weights: the same seed gives the same model at TP=2
    for k in t1:
        assert torch.equal(loaded[0]["same_seed_tensors"][k], saved["tensors"][k]), k
    # TP=2 rank files (legacy layout): qkv is a contiguous dim-0 chunk of the global per-group
    # layout; gated fc1 holds [gate_r; up_r]; linear_proj / fc2 split dim 1; vocab split dim 0
    L0 = "decoder.layers.0."
    for r, res in enumerate(loaded):
        sd = res["state_dict"]
        qkv = t1["decoder.layers.self_attention.linear_qkv.weight"][0]
        assert torch.equal(sd[L0 + "self_attention.linear_qkv.weight"], qkv.chunk(2)[r])
        fc1 = t1["decoder.layers.mlp.linear_fc1.weight"][0]
        if cfg.gated:
            gate, up = fc1.chunk(2)
            assert torch.equal(sd[L0 + "mlp.linear_fc1.weight"], torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))
        else:
            assert torch.equal(sd[L0 + "mlp.linear_fc1.weight"], fc1.chunk(2)[r])
        proj = t1["decoder.layers.self_attention.linear_proj.weight"][0]
        assert torch.equal(sd[L0 + "self_attention.linear_proj.weight"], proj.chunk(2, dim=1)[r])
        fc2 = t1["decoder.layers.mlp.linear_fc2.weight"][0]
        assert torch.equal(sd[L0 + "mlp.linear_fc2.weight"], fc2.chunk(2, dim=1)[r])
        emb = t1["embedding.word_embeddings.weight"]
        assert torch.equal(sd["embedding.word_embeddings.weight"], emb.chunk(2)[r])
    # and the stacked TP=1 state dict is exactly what torch_dist holds
    stacked = R.stack_layers(saved["state_dict"], cfg.num_layers)
    assert stacked.keys() == t1.keys()
    for k in t1:
        assert torch.equal(stacked[k], t1[k]), k


# ---- tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_roundtrip(tmp_path_factory):
    return _roundtrip(LLAMA, tmp_path_factory.mktemp("llama"))


@pytest.mark.dist
def test_llama_tp1_save_loads_at_tp2_with_same_logits(llama_roundtrip):
    _check_roundtrip(LLAMA, *llama_roundtrip)


@pytest.mark.dist
def test_gpt2_tp1_save_loads_at_tp2_with_same_logits(tmp_path):
    saved, loaded, ck1, ck2 = _roundtrip(GPT2, tmp_path)
    _check_roundtrip(GPT2, saved, loaded, ck1, ck2)
    # GPT-2's gelu_new (HF) = F.gelu(approximate="tanh") = megatron's openai_gelu (--openai-gelu)
    assert saved["model_activation"] == "openai_gelu"
    assert saved["openai_gelu_vs_gelu_new"] < 1e-6 and saved["openai_gelu_vs_torch_tanh"] < 1e-6
    keys = R.dcp_metadata(ck1)
    assert "embedding.position_embeddings.weight" in keys and "output_layer.weight" not in keys
    assert keys["decoder.layers.self_attention.linear_qkv.bias"][1] == (2, 192)
    assert keys["decoder.layers.self_attention.linear_qkv.layer_norm_bias"][1] == (2, 64)
    assert keys["decoder.layers.mlp.linear_fc1.bias"][1] == (2, 256)
    assert keys["decoder.final_layernorm.bias"][1] == (64,)


@pytest.mark.dist
def test_llama_torch_dist_key_inventory(llama_roundtrip):
    saved, _, ck1, ck2 = llama_roundtrip
    meta = R.dcp_metadata(ck1)
    tensors = {k: m[1] for k, m in meta.items() if m[0] == "tensor"}
    objects = {k for k, m in meta.items() if m[0] == "bytes"}
    assert tensors == LLAMA_DCP_KEYS
    assert all(m[2] == torch.float32 for m in meta.values() if m[0] == "tensor")
    common = {"common_state/shard_0_1"} if R.common_in_dcp() else set()  # megatron-core >= 0.17
    assert objects == LLAMA_DCP_OBJECTS | common
    assert all(v == [None] for k, v in R.read_dcp_objects(ck1).items() if k not in common)  # torch.save([obj.data])
    assert R.dcp_metadata(ck2) == meta  # TP=2 writes the same keys, shapes and objects

    meta_files = {".metadata", "metadata.json"} | (set() if common else {"common.pt"})
    per_rank = range(1) if common else range(2)  # >= 0.17: one file per rank
    assert {p.name for p in ck1.iterdir()} == meta_files | {f"__0_{i}.distcp" for i in per_rank}
    assert {p.name for p in ck2.iterdir()} == meta_files | {f"__{r}_{i}.distcp" for r in range(2) for i in per_rank}
    written = R.json.loads((ck1 / "metadata.json").read_text())
    if common:  # no common backend: there is no common.pt
        assert written == {k: v for k, v in R.METADATA_JSON.items() if not k.startswith("common")}
        common = R.read_dcp_objects(ck1)["common_state/shard_0_1"][0]
    else:
        assert written == R.METADATA_JSON
        common = torch.load(ck1 / "common.pt", weights_only=False)
    assert set(common) == {"checkpoint_version", "iteration", "args", "content_metadata"}
    assert common["content_metadata"] == R.CONTENT_METADATA
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.padded_vocab_size) == (2, 64, 2, 1024)
    assert args.swiglu and args.normalization == "RMSNorm" and args.untie_embeddings_and_output_weights

    # how megatron maps its (local-spec) state dict onto those keys
    sk = saved["sharded_keys"]
    assert sk["decoder.layers.1.input_layernorm.weight"]["key"] == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert sk["decoder.layers.1.input_layernorm.weight"]["global_offset"] == (1, 0)
    assert sk["decoder.layers.0.mlp.linear_fc1.weight"] == dict(kind="factory", key="decoder.layers.mlp.linear_fc1.weight", local_shape=(320, 64))
    assert sk["embedding.word_embeddings.weight"]["allow_shape_mismatch"]
    assert sk["output_layer.weight"]["allow_shape_mismatch"]
    assert "output_layer._extra_state" not in sk

    # the legacy "torch"-format state dict: local names, _extra_state None on every linear
    sd = saved["state_dict"]
    extra = {k for k in sd if k.endswith("_extra_state")}
    assert extra == {f"decoder.layers.{i}.{m}._extra_state" for i in range(2) for m in
                     ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")} | {
        "output_layer._extra_state"}
    assert all(sd[k] is None for k in extra)
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k not in extra}
    assert shapes == {
        "embedding.word_embeddings.weight": (1024, 64),
        **{f"decoder.layers.{i}.{n}": s for i in range(2) for n, s in {
            "input_layernorm.weight": (64,),
            "self_attention.linear_qkv.weight": (128, 64),
            "self_attention.linear_proj.weight": (64, 64),
            "pre_mlp_layernorm.weight": (64,),
            "mlp.linear_fc1.weight": (320, 64),
            "mlp.linear_fc2.weight": (64, 160),
        }.items()},
        "decoder.final_layernorm.weight": (64,),
        "output_layer.weight": (1024, 64),
    }


@pytest.mark.dist
def test_plain_dcp_checkpoint_loads_in_megatron(llama_roundtrip, tmp_path):
    """What mzoo writes: plain global tensors (stacked from the TP=1 state dict) with plain
    torch.distributed.checkpoint.save, plus metadata.json and common.pt.

    Without `_extra_state` entries megatron's default load (--dist-ckpt-strictness
    assume_ok_unexpected) refuses it; it loads with log_unexpected + a non-strict module load.
    With the `_extra_state` objects written as plain DCP bytes it loads with the defaults and a
    strict module load, at TP=2, and with an unpadded vocabulary."""
    saved = llama_roundtrip[0]
    tensors = R.stack_layers(saved["state_dict"], LLAMA.num_layers)
    common = {"checkpoint_version": 3.0, "iteration": 5, "args": R.megatron_args(LLAMA, 1, PADDED)}
    extra_keys = sorted(R.extra_state_entries(LLAMA.num_layers))
    assert set(extra_keys) == LLAMA_DCP_OBJECTS

    # (1) tensors only
    bare = tmp_path / "tensors_only"
    R.write_plain_dcp_checkpoint(tensors, bare, common)
    assert {k: m[1] for k, m in R.dcp_metadata(bare).items()} == LLAMA_DCP_KEYS
    for r in map(R.unpack, D.run(_load_default_then_lenient, 2, LLAMA, bare, IDS, PADDED)):
        assert r["error"] is not None and "Missing key in checkpoint state_dict" in r["error"]
        assert "_extra_state/shard_" in r["error"]
        torch.testing.assert_close(r["logits"], saved["logits"], atol=1e-5, rtol=0)
        missing, unexpected = r["common"]["_incompatible_keys"]
        assert unexpected == [] and all(k.endswith("._extra_state") for k in missing)

    # (2) tensors + _extra_state objects: Megatron's defaults, strict module load, TP=2
    full = tmp_path / "with_extra_state"
    R.write_plain_dcp_checkpoint({**tensors, **R.extra_state_entries(LLAMA.num_layers)}, full, common)
    theirs = {k: v for k, v in R.dcp_metadata(llama_roundtrip[2]).items() if k != "common_state/shard_0_1"}
    assert R.dcp_metadata(full) == theirs  # same inventory as megatron's (>= 0.17 adds its common state object)
    for r in map(R.unpack, D.run(_load, 2, LLAMA, full, IDS, PADDED)):
        torch.testing.assert_close(r["logits"], saved["logits"], atol=1e-5, rtol=0)
        assert r["common"]["iteration"] == 5 and r["common"]["_incompatible_keys"] == ([], [])

    # (3) unpadded vocabulary (1000 rows) into a model padded to 1024: megatron fills rows [:1000]
    trimmed = {**tensors, **R.extra_state_entries(LLAMA.num_layers)}
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        trimmed[k] = tensors[k][:VOCAB]
    unpadded = tmp_path / "unpadded"
    R.write_plain_dcp_checkpoint(trimmed, unpadded, common)
    r = R.unpack(D.run(_load, 1, LLAMA, unpadded, IDS, PADDED)[0])
    torch.testing.assert_close(r["logits"][..., :VOCAB], saved["logits"][..., :VOCAB], atol=1e-5, rtol=0)
    assert torch.count_nonzero(r["tensors"]["output_layer.weight"][VOCAB:]) == 0
    assert torch.count_nonzero(r["tensors"]["embedding.word_embeddings.weight"][VOCAB:]) == 0


def test_unsupported_configs_are_named():
    assert R.unsupported(GPT2) is None and R.unsupported(LLAMA) is None
    assert "llama3" in R.unsupported(LLAMA.replace(**{"rope.scaling": "llama3", "rope.factor": 8.0,
                                                      "rope.original_max_position_embeddings": 4096}))
    assert R.unsupported(LLAMA.replace(**{"rope.scaling": "llama3", "rope.factor": 8.0,
                                          "rope.original_max_position_embeddings": 8192})) is None
