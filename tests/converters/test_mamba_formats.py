"""Mamba-1, Mamba-2 and a NemotronH hybrid (M, *, -, E layers) through every Megatron format:
HF -> Megatron (TP 1/2 x PP 1/2, TE and local spec) -> HF is bit-exact; legacy rank files hold each
rank's per-section slices; torch_dist/zarr keys are per layer with in_proj/conv1d split into their
sections, as megatron-core's MambaMixer stores them; args alone rebuild the config; TP reshards are
exact; bad TP fails with one sentence and writes nothing. The last tests build megatron-core
0.16.1's own MambaModel on CPU (its GPU kernel packages stubbed: it never runs a forward) and check
that mzoo's names and shapes are its own and that it loads what mzoo writes (and the reverse)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Mamba2Config, MambaConfig, NemotronHConfig

from mzoo.ckpt import dcp_meta
from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.megatron.args import args_to_config, config_to_args
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
from mzoo.ckpt.megatron.checkpoint import Target
from mzoo.config import ConfigError
from mzoo.jobs.convert import convert, plan_layout
from mzoo.jobs.sources import open_source
from mzoo.layout import Layout
from mzoo.zoo import resolve

HYBRID = dict(vocab_size=160, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              intermediate_size=48, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, chunk_size=8,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              moe_shared_expert_intermediate_size=24)
MODELS = {
    # tied, biases, dt_rank 3: in_proj [x; z]
    "mamba1": MambaConfig(vocab_size=160, hidden_size=32, num_hidden_layers=2, state_size=8, time_step_rank=3,
                          use_bias=True),
    # 4 heads in 2 groups: TP2 gives each rank one group
    "mamba2": Mamba2Config(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, n_groups=2,
                           state_size=8, chunk_size=16),
    "nemotron_h": NemotronHConfig(**HYBRID, layers_block_type=["linear_attention", "full_attention", "mlp", "moe"]),
}


def _grid() -> list[tuple[str, int, int, str]]:
    """(format, tp, pp, spec): every TP x PP in torch and torch_dist, spec alternating so that each
    spec meets every TP and every PP; a zarr subset."""
    out = [(fmt, tp, pp, ("te", "local")[(tp + pp) % 2]) for fmt in ("torch", "torch_dist")
           for tp in (1, 2) for pp in (1, 2)]
    return out + [("zarr", 2, 1, "local"), ("zarr", 1, 2, "te")]


CASES = [(model, layout) for model in MODELS for layout in _grid()]


def _case_id(case) -> str:
    model, (fmt, tp, pp, spec) = case
    return f"{model}-{fmt}-tp{tp}pp{pp}-{spec}"


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same(a, b) -> None:
    before, after = _tensors(a), _tensors(b)
    assert set(before) == set(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name


def _legacy(out, rank: str, iteration: int | str = "release") -> dict:
    folder = "release" if iteration == "release" else f"iter_{iteration:07d}"
    return torch.load(out / folder / rank / "model_optim_rng.pt", weights_only=False)


def _one_sentence(text: str) -> None:
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from conftest import make_moe_model

    root = tmp_path_factory.mktemp("src")
    return {name: make_moe_model(root / name, cfg) for name, cfg in MODELS.items()}


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_round_trip_is_bit_exact(sources, tmp_path, case):
    model, (fmt, tp, pp, spec) = case
    mid, back = tmp_path / "megatron", tmp_path / "back"
    convert(open_source(sources[model]), mid, Target(fmt, MegatronCheckpoint(layout=Layout(tp=tp, pp=pp), spelling=spec)))
    m = open_source(mid)
    assert (m.fmt, m.megatron.spelling, m.megatron.layout.tp, m.megatron.layout.pp) == (fmt, spec, tp, pp)
    convert(m, back, Target("hf"))
    _assert_same(sources[model], back)


def test_reshard_tp2_to_tp1_is_exact(sources, tmp_path):
    """hybrid: legacy TP2 x PP2 (TE) -> torch_dist TP1 (local) -> legacy TP1 (local) -> zarr TP2 -> HF;
    the TP1 rank file equals a direct HF -> TP1 conversion tensor for tensor."""
    src = sources["nemotron_h"]
    a, b, c, d, back, direct = (tmp_path / n for n in ("a", "b", "c", "d", "back", "direct"))
    convert(open_source(src), a, Target("torch", MegatronCheckpoint(layout=Layout(tp=2, pp=2))))
    convert(open_source(a), b, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=1), spelling="local")))
    convert(open_source(b), c, Target("torch", MegatronCheckpoint(layout=Layout(tp=1), spelling="local")))
    convert(open_source(c), d, Target("zarr", MegatronCheckpoint(layout=Layout(tp=2))))
    convert(open_source(d), back, Target("hf"))
    _assert_same(src, back)
    convert(open_source(src), direct, Target("torch", MegatronCheckpoint(layout=Layout(tp=1), spelling="local")))
    got, want = _legacy(c, "mp_rank_00")["model"], _legacy(direct, "mp_rank_00")["model"]
    assert set(got) == set(want)
    assert all(torch.equal(v, want[k]) if v is not None else want[k] is None for k, v in got.items())


# ---- what lands where -----------------------------------------------------------------------------
def test_legacy_rank_files_hold_per_section_slices(sources, tmp_path):
    """TP rank r's in_proj rows are [z_r; x_r; B_r; C_r; dt_r], conv1d's [x_r; B_r; C_r]; local layer
    numbering; `_extra_state` next to in_proj/out_proj; the final norm on the last stage; the
    local spec spells the Mamba pre-norm `decoder.layers.N.norm.weight`."""
    hf = _tensors(sources["mamba2"])
    for spec in ("te", "local"):
        out = tmp_path / spec
        convert(open_source(sources["mamba2"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2, pp=2), spelling=spec)))
        last = _legacy(out, "mp_rank_01_001")["model"]  # TP rank 1, stage 1 = global layer 1
        w = hf["backbone.layers.1.mixer.in_proj.weight"]  # [z 64; x 64; B 16; C 16; dt 4]
        z, x, B, C, dt = w.split([64, 64, 16, 16, 4])
        mixer = "decoder.layers.0.mixer."
        assert torch.equal(last[mixer + "in_proj.weight"], torch.cat([z[32:], x[32:], B[8:], C[8:], dt[2:]]))
        conv = hf["backbone.layers.1.mixer.conv1d.weight"]  # [x 64; B 16; C 16]
        assert torch.equal(last[mixer + "conv1d.weight"], torch.cat([conv[32:64], conv[72:80], conv[88:]]))
        assert torch.equal(last[mixer + "out_proj.weight"], hf["backbone.layers.1.mixer.out_proj.weight"][:, 32:])
        assert torch.equal(last["decoder.layers.0.mixer.A_log"], hf["backbone.layers.1.mixer.A_log"][2:])
        assert last["decoder.layers.0.mixer.in_proj._extra_state"] is None
        assert last["decoder.layers.0.mixer.out_proj._extra_state"] is None
        assert "decoder.layers.1.mixer.A_log" not in last and "decoder.final_norm.weight" in last
        assert last["output_layer._extra_state"] is None
        norm = hf["backbone.layers.1.norm.weight"]
        key = "decoder.layers.0.norm.weight" if spec == "local" else "decoder.layers.0.mixer.in_proj.layer_norm_weight"
        assert torch.equal(last[key], norm) and not any(k.endswith("conv1d._extra_state") for k in last)
        first = _legacy(out, "mp_rank_00_000")["model"]
        assert "decoder.final_norm.weight" not in first and "embedding.word_embeddings.weight" in first


def test_args_name_the_mamba_model(sources, tmp_path):
    out = tmp_path / "m"
    convert(open_source(sources["nemotron_h"]), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    args = _legacy(out, "mp_rank_00")["args"]
    assert (args.is_hybrid_model, args.hybrid_override_pattern, args.mamba_state_dim, args.mamba_head_dim,
            args.mamba_num_groups, args.mamba_num_heads) == (True, "M*-E", 8, 16, 2, 4)
    assert args.spec == ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
    assert args.mzoo_family == "mamba" and args.squared_relu and args.num_experts == 4


def test_config_survives_args_alone(sources, tmp_path):
    """Without mzoo.yaml the architecture comes from the args (and for presets, config_to_args ->
    args_to_config is the identity on the architecture)."""
    for model in MODELS:
        cfg = open_source(sources[model]).cfg
        for fmt in ("torch", "torch_dist"):
            out = tmp_path / f"{model}-{fmt}"
            convert(open_source(sources[model]), out, Target(fmt, MegatronCheckpoint(layout=Layout(tp=2), spelling="local")))
            (out / "mzoo.yaml").unlink()
            src = open_source(out)
            assert src.cfg.architecture_differences(cfg) == [] and src.cfg.family == "mamba"
            assert src.megatron.spelling == "local"
    for name in ("mamba1-tiny", "mamba-tiny", "mamba-hybrid-tiny", "mamba-130m", "mamba2-130m", "mamba2-hybrid-8b"):
        cfg = resolve(name)
        got = args_to_config(config_to_args(cfg, MegatronCheckpoint(layout=Layout(tp=2)), torch.bfloat16))
        assert got.architecture_differences(cfg) == [] and got.ssm == cfg.ssm, name


def test_megatron_lm_args_without_mzoo_fields():
    """Args as Megatron-LM writes them for Mamba2-Hybrid-8B (examples/mamba): megatron-core's
    MambaMixer defaults fill in what they do not say (expand 2, d_conv 4, chunk 128)."""
    cfg = resolve("mamba2-hybrid-8b")
    args = argparse.Namespace(
        num_layers=56, hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=32, group_query_attention=True,
        num_query_groups=8, kv_channels=128, max_position_embeddings=4096, position_embedding_type="none",
        normalization="RMSNorm", norm_epsilon=1e-5, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        vocab_size=256000, padded_vocab_size=256000, is_hybrid_model=False,
        hybrid_override_pattern=cfg.ssm.hybrid_pattern, hybrid_attention_ratio=0.08, hybrid_mlp_ratio=0.5,
        mamba_state_dim=128, mamba_head_dim=64, mamba_num_groups=8,
        spec=["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"])
    got = args_to_config(args)
    assert got.architecture_differences(cfg) == [] and got.family == "mamba"
    vars(args).update(mamba_num_heads=192)  # 192 x 64 = 3 x hidden
    assert args_to_config(args).ssm.expand == 3
    vars(args).update(mamba_num_heads=100)
    with pytest.raises(CheckpointError, match="is not a multiple of hidden_size") as e:
        args_to_config(args)
    _one_sentence(str(e.value))
    vars(args).update(mamba_num_heads=None, hybrid_override_pattern=None)
    with pytest.raises(CheckpointError, match="without a hybrid_override_pattern") as e:
        args_to_config(args)
    _one_sentence(str(e.value))


MAMBA2_LAYER_DIST = {  # key -> global shape: hidden 32, d_inner 64, 4 heads, 2 groups x d_state 8
    "decoder.layers.1.mixer.A_log": (4,), "decoder.layers.1.mixer.D": (4,), "decoder.layers.1.mixer.dt_bias": (4,),
    "decoder.layers.1.mixer.in_proj.layer_norm_weight": (32,),
    "decoder.layers.1.mixer.in_proj.weight.z": (64, 32), "decoder.layers.1.mixer.in_proj.weight.x": (64, 32),
    "decoder.layers.1.mixer.in_proj.weight.B": (16, 32), "decoder.layers.1.mixer.in_proj.weight.C": (16, 32),
    "decoder.layers.1.mixer.in_proj.weight.dt": (4, 32),
    "decoder.layers.1.mixer.conv1d.weight.x": (64, 1, 4), "decoder.layers.1.mixer.conv1d.weight.B": (16, 1, 4),
    "decoder.layers.1.mixer.conv1d.weight.C": (16, 1, 4), "decoder.layers.1.mixer.conv1d.bias.x": (64,),
    "decoder.layers.1.mixer.conv1d.bias.B": (16,), "decoder.layers.1.mixer.conv1d.bias.C": (16,),
    "decoder.layers.1.mixer.norm.weight": (64,), "decoder.layers.1.mixer.out_proj.weight": (32, 64),
    "decoder.layers.1.mixer.in_proj._extra_state/shard_0_1": None,
    "decoder.layers.1.mixer.out_proj._extra_state/shard_0_1": None,
}


@pytest.mark.parametrize("fmt", ["torch_dist", "zarr"])
def test_dist_keys_are_per_layer_and_split(sources, tmp_path, fmt):
    import mcore_ref as R

    hf = _tensors(sources["mamba2"])
    for spec in ("te", "local"):
        out = tmp_path / f"{fmt}-{spec}"
        convert(open_source(sources["mamba2"]), out, Target(fmt, MegatronCheckpoint(layout=Layout(tp=2), spelling=spec)))
        folder = out / "release"
        if fmt == "torch_dist":
            meta = {k: v[1] if v[0] == "tensor" else None for k, v in R.dcp_metadata(folder).items()}
            values = R.read_dcp_tensors(folder)
        else:
            from mzoo.ckpt.zarr import ZarrReader

            reader = ZarrReader(folder)  # arrays only: the object folders hold no .zarray
            meta = {k: reader.shape(k) for k in reader.keys()}
            values = {k: reader.read(k) for k in reader.keys()}
            objects = {str(p.relative_to(folder))[:-3]: p for p in folder.glob("*/shard_*.pt")}
            assert not set(objects) & set(meta) and all(torch.load(p) is None for p in objects.values())
            meta.update(dict.fromkeys(objects))  # megatron's common strategy: <unique key>.pt holding None
        layer1 = {k: v for k, v in meta.items() if k.startswith("decoder.layers.1.")}
        assert layer1 == MAMBA2_LAYER_DIST, spec
        assert not any(k.startswith("decoder.layers.mixer") for k in meta)  # never stacked
        assert {"decoder.final_norm.weight", "embedding.word_embeddings.weight", "output_layer.weight"} <= set(meta)
        z, x, B, C, dt = hf["backbone.layers.1.mixer.in_proj.weight"].split([64, 64, 16, 16, 4])
        for name, part in zip("z x B C dt".split(), (z, x, B, C, dt)):
            assert torch.equal(values[f"decoder.layers.1.mixer.in_proj.weight.{name}"], part)
        bias = hf["backbone.layers.1.mixer.conv1d.bias"]
        assert torch.equal(values["decoder.layers.1.mixer.conv1d.bias.C"], bias[80:])
    assert "output_layer._extra_state/shard_0_1" in meta  # MambaModel, unlike GPTModel, declares it


def test_hybrid_and_mamba1_dist_keys(sources, tmp_path):
    """Hybrid: attention/MLP layers under their TE names in both specs, the MoE layer's own
    pre_mlp_layernorm, experts with a global axis, all per layer. Mamba-1 (mzoo's own names): in_proj
    split into `.x`/`.z`, conv1d, x_proj and dt_proj whole."""
    import mcore_ref as R

    hy, m1 = tmp_path / "hy", tmp_path / "m1"
    convert(open_source(sources["nemotron_h"]), hy, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2), spelling="local")))
    convert(open_source(sources["mamba1"]), m1, Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2))))
    meta = R.dcp_metadata(hy / "release")
    assert {"decoder.layers.0.mixer.in_proj.weight.dt", "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.1.self_attention.linear_qkv._extra_state/shard_0_1",
            "decoder.layers.2.mlp.linear_fc1.layer_norm_weight",
            "decoder.layers.2.mlp.linear_fc2._extra_state/shard_0_1",
            "decoder.layers.3.pre_mlp_layernorm.weight", "decoder.layers.3.mlp.router.expert_bias",
            "decoder.layers.3.mlp.experts.experts.linear_fc1._extra_state/shard_3_4",
            "decoder.layers.3.mlp.shared_experts.linear_fc1.weight"} <= set(meta)
    assert meta["decoder.layers.3.mlp.experts.experts.linear_fc1.weight"][1] == (4, 16, 32)
    assert not any(".norm.weight" in k and "mixer" not in k and "final" not in k for k in meta)
    meta = R.dcp_metadata(m1 / "release")
    x, z = (meta[f"decoder.layers.0.mixer.in_proj.weight.{s}"][1] for s in "xz")
    assert x == z == (64, 32)
    assert meta["decoder.layers.0.mixer.in_proj.bias.z"][1] == (64,)
    assert {"decoder.layers.1.mixer.conv1d.weight", "decoder.layers.1.mixer.x_proj.weight",
            "decoder.layers.1.mixer.dt_proj.bias", "decoder.layers.1.mixer.in_proj._extra_state/shard_0_1"} <= set(meta)


def test_plan_matches_what_is_written(sources, tmp_path):
    import mcore_ref as R

    src = open_source(sources["nemotron_h"])
    for fmt in ("torch", "torch_dist"):
        target = Target(fmt, MegatronCheckpoint(layout=Layout(tp=2, pp=2), spelling="local", iteration="release"), torch.float32)
        plan = plan_layout(src.cfg, target)
        out = tmp_path / fmt
        convert(src, out, target)
        if fmt == "torch":
            assert len(plan.files) == 4
            for f in plan.files:
                state = torch.load(out / f.path, weights_only=False)["model"]
                tensors = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
                assert tensors == {e.key: e.shape for e in f.entries}, f.path
        else:
            meta = R.dcp_metadata(out / plan.files[0].path)
            planned = {e.key: e.shape for e in plan.files[0].entries}
            assert {k: v[1] for k, v in meta.items() if v[0] == "tensor"} == planned


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, tp, match", [
    ("mamba2", 8, "must divide the Mamba-2 heads (4) and groups (2)"),
    ("nemotron_h", 4, "tensor parallel size 4 does not divide"),  # attention's 2 groups, then Mamba's
    ("mamba1", 3, "does not divide the Mamba inner size (64)"),
])
def test_tp_that_does_not_divide_the_mixer(sources, tmp_path, model, tp, match):
    for fmt in ("torch", "torch_dist"):
        with pytest.raises(ConfigError) as e:
            convert(open_source(sources[model]), tmp_path / "x", Target(fmt, MegatronCheckpoint(layout=Layout(tp=tp))))
        assert match in str(e.value)
        _one_sentence(str(e.value))
        assert not list(tmp_path.iterdir())


def test_missing_section_is_named(sources, tmp_path):

    from mzoo.ckpt.safe_pickle import load_dcp_metadata

    out = tmp_path / "m"
    convert(open_source(sources["mamba2"]), out, Target("torch_dist", MegatronCheckpoint()))
    meta_file = out / "release" / ".metadata"
    meta = load_dcp_metadata(meta_file, False)
    del meta.state_dict_metadata["decoder.layers.1.mixer.in_proj.weight.B"]
    meta_file.write_bytes(dcp_meta.dumps(meta))
    with pytest.raises(CheckpointError, match=r"has no tensor decoder.layers.1.mixer.in_proj.weight.z \(for "
                                              r"decoder.layers.1.mixer.in_proj.weight\)"):
        convert(open_source(out), tmp_path / "hf", Target("hf"))
    assert not (tmp_path / "hf").exists()


# ---- command line -----------------------------------------------------------------------------------
def _mzoo(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mzoo.cli.main", *map(str, args)], capture_output=True, text=True,
                          check=True)


def test_cli_plan_and_inspect(sources, tmp_path):
    out = tmp_path / "m"
    plan = json.loads(_mzoo("convert", "hf->megatron", sources["mamba2"], out, "--tp", "2", "--pp", "2",
                            "--megatron-format", "torch_dist", "--plan", "--json").stdout)
    keys = {t[0]: t[1] for t in plan["files"][0]["tensors"]}
    assert keys["decoder.layers.1.mixer.in_proj.weight.dt"] == [4, 32] and not out.exists()
    plan = json.loads(_mzoo("convert", "hf->megatron", "mamba-hybrid-tiny", out, "--tp", "2", "--megatron-format",
                            "torch", "--plan", "--json").stdout)
    assert len(plan["files"]) == 2 and not out.exists()
    _mzoo("convert", "hf->megatron", sources["mamba2"], out, "--tp", "2", "--megatron-format", "torch",
          "--spec", "local")
    info = json.loads(_mzoo("inspect", out, "--json").stdout)
    assert (info["format"], info["tp"], info["spec"], info["model"]["family"]) == ("torch", 2, "local", "mamba")
    assert info["model"]["ssm"]["num_groups"] == 2 and info["problems"] == []


# ---- megatron-core itself (its MambaModel built on CPU, names and loads only) ----------------------
def _state(model) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}


def _mcore_round(rank, world, cfg, padded, mzoo_dist, mzoo_legacy, save_to, args, mzoo_zarr, zarr_objects_to):
    """On each TP rank: megatron-core's names (state_dict, torch_dist keys), its state after loading
    mzoo's torch_dist (default strictness) and mzoo's legacy rank file (strict), and a checkpoint
    megatron-core saves itself (with the args mzoo writes) plus the state it saved. On the way, its
    zarr object strategy loads the `_extra_state` objects from mzoo's zarr and saves its own."""
    import mcore_ref as R
    from mcore_mamba import build_mcore_mamba

    model = build_mcore_mamba(cfg, world, padded)
    names = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    keys = {k: tuple(v.shape) for k, v in R.global_tensors(model).items()}
    keys.update({info["key"]: None for info in R.sharded_keys(model).values() if info["kind"] == "object"})
    zarr_objects = R.zarr_objects(model, mzoo_zarr, zarr_objects_to)
    assert set(zarr_objects) == {k for k, v in keys.items() if v is None}
    assert all(v is None for v in zarr_objects.values())
    R.load_dist_checkpoint(model, mzoo_dist)
    from_dist = _state(model)
    legacy = torch.load(mzoo_legacy / f"mp_rank_{rank:02d}" / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(legacy["model"], strict=True)
    from_legacy = _state(model)
    fresh = build_mcore_mamba(cfg, world, padded)
    R.perturb_(fresh, seed=3)
    R.save_dist_checkpoint(fresh, save_to / "iter_0000005", args=args, iteration=5)
    if rank == 0:
        (save_to / "latest_checkpointed_iteration.txt").write_text("5")
    return R.pack((names, keys, from_dist, from_legacy, _state(fresh)))


@pytest.mark.dist
@pytest.mark.parametrize("model", ["mamba2", "nemotron_h"])
def test_megatron_core_reads_and_writes_the_same_checkpoints(sources, tmp_path, model):
    """megatron-core 0.16.1's MambaModel (local spec, TP2): its state_dict names/shapes are mzoo's
    legacy rank files', its torch_dist keys/shapes mzoo's (split sections, per layer, `_extra_state`
    objects, which its zarr object strategy finds in mzoo's zarr and saves as the same files);
    it loads mzoo's torch_dist at Megatron-LM's default strictness and mzoo's rank files
    with strict=True, getting mzoo's tensors; mzoo reads the torch_dist checkpoint megatron-core
    saves and writes it back as exactly megatron-core's rank state."""
    import dist as D
    import mcore_ref as R

    if R.common_in_dcp():  # make test-mcore-latest
        pytest.skip("megatron-core >= 0.17 builds MambaModel's layers through HybridStack, which needs Transformer "
                    "Engine (0.16.1 in CI builds it)")

    src = open_source(sources[model])
    lay = MegatronCheckpoint(layout=Layout(tp=2), spelling="local")
    dist_out, legacy_out, mcore_out, again, zarr_out, objects_out = (
        tmp_path / n for n in ("dist", "legacy", "mcore", "again", "zarr", "objects"))
    convert(src, dist_out, Target("torch_dist", lay))
    convert(src, legacy_out, Target("torch", lay))
    convert(src, zarr_out, Target("zarr", lay))
    padded = lay.padded_vocab(src.cfg)
    args = config_to_args(src.cfg, lay, torch.float32)
    mcore_out.mkdir()
    objects_out.mkdir()
    results = [R.unpack(r) for r in D.run(_mcore_round, 2, src.cfg, padded, dist_out / "release",
                                          legacy_out / "release", mcore_out, args, zarr_out / "release",
                                          objects_out, timeout=600)]
    shards = lambda folder: {str(p.relative_to(folder)): p.read_bytes() for p in folder.glob("*/shard_*.pt")}  # noqa: E731
    assert shards(objects_out) == shards(zarr_out / "release")  # megatron's zarr save: the same files
    ours = [_legacy(legacy_out, f"mp_rank_{t:02d}")["model"] for t in range(2)]
    meta = R.dcp_metadata(dist_out / "release")
    for t, (names, keys, from_dist, from_legacy, _) in enumerate(results):
        assert names == {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in ours[t].items()}
        assert keys == {k: (v[1] if v[0] == "tensor" else None) for k, v in meta.items()}
        for loaded in (from_dist, from_legacy):
            for k, v in ours[t].items():
                assert (torch.equal(loaded[k], v) if v is not None else loaded[k] is None), k
    convert(open_source(mcore_out), again, Target("torch", lay))  # megatron-core's own torch_dist
    vocab = src.cfg.vocab_size
    for t in range(2):
        theirs, back = results[t][4], _legacy(again, f"mp_rank_{t:02d}", 5)["model"]
        assert set(theirs) == set(back)
        for k, v in theirs.items():
            if v is None:
                assert back[k] is None, k
            elif k in ("embedding.word_embeddings.weight", "output_layer.weight"):  # padded rows are zero in mzoo
                rows = min(v.shape[0], max(0, vocab - t * v.shape[0]))
                assert torch.equal(back[k][:rows], v[:rows]) and not back[k][rows:].any(), k
            else:
                assert torch.equal(back[k], v), k
