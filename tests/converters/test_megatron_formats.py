"""HF -> Megatron (any format, layout, spelling) -> HF is bit-exact; reshard chains are exact;
bad input fails with one sentence and leaves no output that looks complete."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from mzoo.ckpt.atomic import OutputError
from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.config import ConfigError
from mzoo.jobs.convert import convert
from mzoo.jobs.sources import open_source
from mzoo.jobs.verify import verify_sources
from mzoo.layout import Layout

MODELS = {
    # GQA, untied, vocab 999 is not a multiple of 128 * TP
    "llama": LlamaConfig(vocab_size=999, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=96),
    "llama-tied": LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=96, tie_word_embeddings=True),
    "gpt2": GPT2Config(vocab_size=1001, n_embd=64, n_head=4, n_layer=4, n_positions=64),
    # q/k/v biases without an o bias, tied
    "qwen2": Qwen2Config(vocab_size=999, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=96, tie_word_embeddings=True),
    # per-head q/k norms, head_dim 32 (not 64 / 4)
    "qwen3": Qwen3Config(vocab_size=999, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=96),
}
QWEN = ("qwen2", "qwen3")

# (format, tp, pp, vpp, first, last, spec)
LAYOUTS = [
    ("torch", 1, 1, 1, None, None, "te"),
    ("torch", 2, 2, 1, None, None, "te"),
    ("torch", 4, 1, 1, None, None, "local"),
    ("torch", 1, 3, 1, 1, 1, "te"),  # uneven: 1 + 2 + 1
    ("torch", 2, 2, 2, None, None, "local"),  # VPP 2
    ("torch_dist", 1, 1, 1, None, None, "te"),
    ("torch_dist", 2, 2, 1, None, None, "local"),
    ("torch_dist", 4, 1, 1, None, None, "te"),
    ("torch_dist", 1, 2, 2, None, None, "te"),
    ("zarr", 2, 1, 1, None, None, "te"),
    ("zarr", 1, 2, 1, None, None, "local"),
]


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _layout_id(l):
    fmt, tp, pp, vpp, first, last, spec = l
    return f"{fmt}-tp{tp}pp{pp}vpp{vpp}{'-uneven' if first else ''}-{spec}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from conftest import make_hf_model

    root = tmp_path_factory.mktemp("src")
    return {name: make_hf_model(root / name, cfg) for name, cfg in MODELS.items()}


ROUND_TRIPS = [(m, l) for m in MODELS for l in LAYOUTS if m not in QWEN]
# Qwen's blocks (qkv bias, q/k norms, own head_dim) through each format, TP, PP, VPP and spelling once
ROUND_TRIPS += [(m, LAYOUTS[i]) for m in QWEN for i in (1, 4, 6, 9)]


@pytest.mark.parametrize("model, layout", ROUND_TRIPS, ids=[f"{m}-{_layout_id(l)}" for m, l in ROUND_TRIPS])
def test_round_trip_is_bit_exact(sources, tmp_path, model, layout):
    fmt, tp, pp, vpp, first, last, spec = layout
    src = sources[model]
    mid = tmp_path / "megatron"
    lay = MegatronCheckpoint(layout=Layout(tp=tp, pp=pp, vpp=vpp, first_stage_layers=first, last_stage_layers=last), spelling=spec)
    convert(open_source(src), mid, Target(fmt, lay))
    back = tmp_path / "back"
    convert(open_source(mid), back, Target("hf"))
    before, after = _tensors(src), _tensors(back)
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not open_source(src).cfg.architecture_differences(open_source(back).cfg)
    # the layout on disk is what was asked for
    m = open_source(mid)
    assert (m.fmt, m.megatron.spelling) == (fmt, spec)
    if fmt == "torch":
        assert (m.megatron.layout.tp, m.megatron.layout.pp, m.megatron.layout.vpp) == (tp, pp, vpp)


def _without_extents(source):
    source.extents = None  # every tensor is read and made in memory: the reference path
    return source


def _copies(monkeypatch) -> list[int]:
    """Counts the kernel copies FileSinks are asked for."""
    from mzoo.ckpt.sink import FileSink

    calls, original = [], FileSink.copy
    monkeypatch.setattr(FileSink, "copy", lambda self, extents: calls.append(len(extents)) or original(self, extents))
    return calls


def _dist_tensors(folder):
    from mzoo.ckpt.dist import DistReader

    reader = DistReader(folder)
    return {k: reader.read(k) for k in reader.keys()}, reader.metadata


@pytest.mark.parametrize("fmt,tp,pp", [("torch_dist", 2, 2), ("torch", 2, 2), ("torch", 4, 1)])
def test_kernel_copies_write_what_the_read_path_writes(sources, tmp_path, monkeypatch, fmt, tp, pp):
    """Tensors that are whole-row ranges of the source are copied by the kernel (QKV grouped per
    query group, [gate; up] per TP section, padded vocabulary); the checkpoint holds exactly what
    reading, regrouping and writing each tensor produces, and so does the way back to HF."""
    calls = _copies(monkeypatch)
    lay = MegatronCheckpoint(layout=Layout(tp=tp, pp=pp))
    convert(open_source(sources["llama"]), tmp_path / "fast", Target(fmt, lay))
    assert calls, "no tensor took the kernel-copy path"
    convert(_without_extents(open_source(sources["llama"])), tmp_path / "slow", Target(fmt, lay))
    iteration = "release"
    if fmt == "torch_dist":
        (fast, fast_meta), (slow, slow_meta) = (_dist_tensors(tmp_path / x / iteration) for x in ("fast", "slow"))
        assert fast_meta.state_dict_metadata == slow_meta.state_dict_metadata
    else:
        fast, slow = ({str(f.relative_to(tmp_path / x)): torch.load(f, weights_only=False)
                       for f in sorted((tmp_path / x).rglob("model_optim_rng.pt"))} for x in ("fast", "slow"))
        assert fast.keys() == slow.keys() and len(fast) == tp * pp
        fast = {(f, k): v for f, state in fast.items() for k, v in state["model"].items()}
        slow = {(f, k): v for f, state in slow.items() for k, v in state["model"].items()}
    assert fast.keys() == slow.keys()
    for key in fast:
        assert (fast[key] is None and slow[key] is None) or torch.equal(fast[key], slow[key]), key
    calls.clear()
    convert(open_source(tmp_path / "fast"), tmp_path / "back-fast", Target("hf"))
    assert bool(calls) == (fmt == "torch_dist")  # legacy rank files are read, not copied, on the way back
    convert(_without_extents(open_source(tmp_path / "fast")), tmp_path / "back-slow", Target("hf"))
    a, b = _tensors(tmp_path / "back-fast"), _tensors(tmp_path / "back-slow")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_layout_on_disk(sources, tmp_path):
    """Rank folders, local layer numbering, model0/model1 chunks, padded vocab, args, tied copy."""
    out = tmp_path / "m"
    convert(open_source(sources["llama-tied"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2, pp=2, vpp=1))))
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"  # what Megatron-LM's own converters write
    folder = out / "release"
    assert sorted(p.name for p in folder.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                                        "mp_rank_01_001", "tokenizer"]
    last = torch.load(folder / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    names = set(last["model"])
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in names  # local numbering (global 2)
    assert "decoder.layers.2.self_attention.linear_qkv.weight" not in names
    assert last["model"]["output_layer.weight"].shape == (512, 64)  # tied copy, padded 1024 / TP2
    assert last["args"].padded_vocab_size == 1024 and last["args"].tensor_model_parallel_size == 2
    first = torch.load(folder / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    emb = first["model"]["embedding.word_embeddings.weight"]
    assert emb.shape == (512, 64)

    out2 = tmp_path / "v"
    convert(open_source(sources["llama"]), out2, Target("torch", MegatronCheckpoint(layout=Layout(tp=1, pp=2, vpp=2))))
    f = torch.load(out2 / "release" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)
    assert set(k for k in f if k.startswith("model")) == {"model0", "model1"}


def test_gated_fc1_is_split_per_section(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    hf = _tensors(sources["llama"])
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    rank1 = torch.load(out / "release" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
    fc1 = rank1["model"]["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([gate[48:], up[48:]]))


def test_reshard_chain_is_exact(sources, tmp_path):
    src = sources["llama"]
    a = tmp_path / "a"
    convert(open_source(src), a, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2, pp=2))))
    b = tmp_path / "b"
    convert(open_source(a), b, Target("torch", MegatronCheckpoint(layout=Layout(tp=4, pp=1))))
    c = tmp_path / "c"
    convert(open_source(b), c, Target("torch", MegatronCheckpoint(layout=Layout(tp=1, pp=3, first_stage_layers=1, last_stage_layers=1), spelling="local")))
    d = tmp_path / "d"
    convert(open_source(c), d, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2, pp=1), spelling="local")))
    back = tmp_path / "back"
    convert(open_source(d), back, Target("hf"))
    before, after = _tensors(src), _tensors(back)
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)
    assert verify_sources(open_source(src), open_source(c)).max_abs_diff == 0.0


def test_dtype_conversion(sources, tmp_path):
    out = tmp_path / "bf16"
    convert(open_source(sources["gpt2"]), out, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2)), dtype=torch.bfloat16))
    src = open_source(out)
    assert src.dtype == torch.bfloat16
    assert torch.equal(src.get("embedding.word_embeddings.weight"),
                       _tensors(sources["gpt2"])["transformer.wte.weight"].bfloat16())


# ---- bad input ----------------------------------------------------------------------------------
def test_tp_that_does_not_divide_groups(sources, tmp_path):
    with pytest.raises(ConfigError, match="does not divide the 4 query groups"):
        convert(open_source(sources["llama"]), tmp_path / "x", Target("torch", MegatronCheckpoint(layout=Layout(tp=8))))
    assert not (tmp_path / "x").exists()


def test_missing_rank_file(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    (out / "release" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    with pytest.raises(CheckpointError, match="has no model_optim_rng.pt"):
        open_source(out)


def test_truncated_rank_file(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=1))))
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_source(out)


def test_unfinished_dist_save_is_not_a_checkpoint(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch_dist", MegatronCheckpoint()))
    (out / "release" / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="no metadata.json"):
        open_source(out)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_outside_the_allowlist_need_trust(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch", MegatronCheckpoint()))
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    state["evil"] = Evil()
    torch.save(state, f)
    (out / "mzoo.yaml").unlink()  # edited after mzoo.yaml vouched for it (issue 17: its CRC-32 would refuse it)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        open_source(out)
    assert open_source(out, trust_pickle=True).fmt == "torch"


def test_megatron_enums_and_numpy_rng_state_load_without_trust(sources, tmp_path):
    """What real Megatron-LM rank files carry: enums in args, numpy RandomState in rng_state."""
    import numpy as np

    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch", MegatronCheckpoint()))
    f = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    state["rng_state"] = [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]
    torch.save(state, f)
    (out / "mzoo.yaml").unlink()  # as Megatron-LM writes them: no sidecar (its CRC-32 no longer holds)
    assert open_source(out).fmt == "torch"


def test_shape_mismatch_between_config_and_tensors(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["llama"]), out, Target("torch", MegatronCheckpoint()))
    side = out / "mzoo.yaml"
    side.write_text(side.read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 64"))
    with pytest.raises(CheckpointError, match="has shape .* but the config implies"):
        convert(open_source(out), tmp_path / "hf", Target("hf"))
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob("hf.mzoo-tmp*"))


def test_existing_destination_is_not_clobbered(sources, tmp_path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        convert(open_source(sources["llama"]), tmp_path / "dst", Target("torch_dist"))


def test_unknown_format(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint mzoo recognises"):
        open_source(tmp_path / "junk")
