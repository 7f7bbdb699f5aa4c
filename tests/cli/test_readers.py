"""Issue 17 (readers), through the commands: case 16, `--trust-pickle` is honoured wherever the
refusal suggests it (the zarr reader, `train --load`, `finetune`)."""

from __future__ import annotations

import fractions
import shutil

import pytest
import torch
from conftest import make_hf_model
from transformers import LlamaConfig
from typer.testing import CliRunner

from mzoo.cli.main import app
from mzoo.layout import Layout

LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def untrusted_zarr(tmp_path_factory):
    """A zarr checkpoint whose common.pt holds an object outside mzoo's pickle allowlist."""
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.ckpt.megatron.tracker import find_iteration_dir
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("readers")
    hf = make_hf_model(root / "hf", LlamaConfig(**LLAMA))
    out = root / "zarr"
    convert(open_source(hf), out, Target("zarr", MegatronCheckpoint(layout=Layout(tp=1))))
    common = find_iteration_dir(out)[0] / "common.pt"
    state = torch.load(common, weights_only=False)
    state["note"] = fractions.Fraction(1, 3)
    torch.save(state, common)
    (out / "mzoo.yaml").unlink()  # its CRC-32 of common.pt no longer holds
    return out


def test_zarr_reader_honours_trust_pickle(untrusted_zarr):
    from mzoo.ckpt.hf import CheckpointError
    from mzoo.jobs.sources import open_source

    with pytest.raises(CheckpointError, match="--trust-pickle"):
        open_source(untrusted_zarr)
    src = open_source(untrusted_zarr, trust_pickle=True)
    src.get(src.tensors[0].name)


def test_inspect_zarr_with_trust_pickle(untrusted_zarr):
    refused = CliRunner().invoke(app, ["inspect", str(untrusted_zarr)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    ok = CliRunner().invoke(app, ["inspect", str(untrusted_zarr), "--trust-pickle"])
    assert ok.exit_code == 0, ok.output


def test_train_load_takes_trust_pickle(untrusted_zarr):
    args = ["train", "llama-tiny", "--load", str(untrusted_zarr), "--mock-data", "--dry-run", "--device", "cpu"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output, refused.output
    ok = CliRunner().invoke(app, args + ["--trust-pickle"])
    assert ok.exit_code == 0, ok.output


def test_train_hooks_load_with_trust_pickle(untrusted_zarr):
    """The workers' weight loading takes the flag too, not only the check before launch."""
    from mzoo.jobs.sources import open_source
    from mzoo.jobs.train import hooks
    from mzoo.parallel.state import ParallelState

    cfg = open_source(untrusted_zarr, trust_pickle=True).cfg
    h = hooks(Layout(), "fp32", lambda *a: None, trust_pickle=True)
    model = h.build_model(cfg, ParallelState.single(Layout()))
    h.load_weights(model, str(untrusted_zarr))


def test_finetune_takes_trust_pickle(untrusted_zarr, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello world"}\n' * 4)
    args = ["finetune", str(untrusted_zarr), "--data", str(data), "--steps", "1", "--device", "cpu"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output, refused.output
    passed = CliRunner().invoke(app, args + ["--trust-pickle"])
    assert "--trust-pickle" not in passed.output and "No such option" not in passed.output, passed.output
    assert "carries no tokenizer" in passed.output  # got past the checkpoint: the next check speaks


# ---- case 14 (reader parts): a damaged tracker file is one sentence that says what it holds ----------
@pytest.fixture(scope="module")
def legacy_root(tmp_path_factory):
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("tracker")
    hf = make_hf_model(root / "hf", LlamaConfig(**LLAMA))
    out = root / "torch"
    convert(open_source(hf), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=1))))
    return out


@pytest.mark.parametrize("content,said", [(b"banana\n", "'banana'"), (b"", "is empty"), (b"\xff\xfe\x00\x81", "not text"),
                                          (b"-3\n", "'-3'")])
def test_damaged_tracker_is_one_sentence(legacy_root, tmp_path, content, said):
    copy = tmp_path / "ckpt"
    shutil.copytree(legacy_root, copy)
    (copy / "latest_checkpointed_iteration.txt").write_bytes(content)
    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "latest_checkpointed_iteration.txt" in result.output and said in result.output, result.output
    assert "Traceback" not in result.output


def test_tracker_at_a_missing_iteration_says_why(legacy_root, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(legacy_root, copy)
    (copy / "latest_checkpointed_iteration.txt").write_text("42\n")
    result = CliRunner().invoke(app, ["inspect", str(copy)])
    assert result.exit_code == 2 and "iter_0000042" in result.output and "does not exist" in result.output, result.output


# ---- NaN / Inf weights: convert refuses (unless --allow-nonfinite), inspect --check names, generate refuses ----
@pytest.fixture(scope="module")
def nan_hf(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("nonfinite")
    hf = make_hf_model(root / "hf", LlamaConfig(**LLAMA))
    weights = next(hf.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(n for n in tensors if "layers.1.mlp.down_proj" in n)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("direction", ["hf->megatron", "hf->hf"])
def test_convert_refuses_nonfinite_weights(nan_hf, tmp_path, direction):
    out = tmp_path / "out"
    refused = CliRunner().invoke(app, ["convert", direction, str(nan_hf), str(out)])
    assert refused.exit_code == 2 and "NaN or Inf" in refused.output and "--allow-nonfinite" in refused.output, \
        refused.output
    assert "decoder.layers.1.mlp.linear_fc2.weight" in refused.output and not out.exists()
    ok = CliRunner().invoke(app, ["convert", direction, str(nan_hf), str(out), "--allow-nonfinite"])
    assert ok.exit_code == 0, ok.output


def test_inspect_check_names_nonfinite_weights(nan_hf):
    import json

    result = CliRunner().invoke(app, ["inspect", str(nan_hf), "--check", "--json"])
    problems = json.loads(result.output)["problems"]
    assert result.exit_code == 1 and any("decoder.layers.1.mlp.linear_fc2.weight" in p and "NaN or Inf" in p
                                         for p in problems), problems


def test_generate_refuses_nonfinite_weights(nan_hf):
    result = CliRunner().invoke(app, ["generate", str(nan_hf), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"])
    assert result.exit_code == 2 and "NaN or Inf" in result.output, result.output


# ---- case 12: a TP rank of another model in a checkpoint without mzoo.yaml (Megatron-LM's own) ----------
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _legacy_tp2(hf, out):
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    convert(open_source(hf), out, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    (out / "mzoo.yaml").unlink()  # Megatron-LM's own checkpoints carry none: only the rank files speak
    return out


@pytest.fixture(scope="module")
def foreign_ranks(tmp_path_factory):
    """llama-tiny's architecture at TP2 (legacy, no mzoo.yaml), and copies whose mp_rank_01 is not its own:
    another hidden size; a rotary base that changes no shape; the same rank file saved at another
    iteration; another hidden size under this model's args (the shapes alone disagree)."""
    from mzoo.ckpt.megatron.tracker import find_iteration_dir

    root = tmp_path_factory.mktemp("foreign")
    good = _legacy_tp2(make_hf_model(root / "hf", LlamaConfig(**TINY)), root / "good")
    small = _legacy_tp2(make_hf_model(root / "hf-small", LlamaConfig(**{**TINY, "hidden_size": 32}), seed=1),
                        root / "other-small")
    rope = _legacy_tp2(make_hf_model(root / "hf-rope", LlamaConfig(**{**TINY, "rope_theta": 500000.0}), seed=2),
                       root / "other-rope")

    def rank1(ckpt):
        return find_iteration_dir(ckpt)[0] / "mp_rank_01" / "model_optim_rng.pt"

    def variant(name, make):
        copy = root / name
        shutil.copytree(good, copy)
        make(rank1(copy))
        return copy

    own_args = torch.load(rank1(good), weights_only=False)["args"]

    def resaved(src, **top):
        def make(dst):
            state = torch.load(src, weights_only=False)
            state.update(top)
            torch.save(state, dst)
        return make

    out = {"good": good}
    out["hidden"] = variant("hidden", lambda dst: shutil.copy(rank1(small), dst))
    out["rope"] = variant("rope", lambda dst: shutil.copy(rank1(rope), dst))
    out["iteration"] = variant("iteration", resaved(rank1(good), iteration=7))
    out["shapes"] = variant("shapes", resaved(rank1(small), args=own_args))
    return out


SAID = {"hidden": "hidden_size=32", "rope": "rotary_base=500000", "iteration": "iteration 7",
        "shapes": "differently sized models"}


def _command(name, ckpt, tmp_path):
    return {
        "convert": ["convert", "megatron->hf", str(ckpt), str(tmp_path / "out")],
        "verify": ["verify", str(ckpt), str(ckpt)],
        "generate": ["generate", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"],
        "train": ["train", "llama-tiny", "--load", str(ckpt), "--mock-data", "--dry-run", "--device", "cpu"],
    }[name]


COMMANDS = ["convert", "verify", "generate", "train"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variant", list(SAID))
def test_rank_from_another_model_is_refused(foreign_ranks, tmp_path, command, variant):
    result = CliRunner().invoke(app, _command(command, foreign_ranks[variant], tmp_path))
    assert result.exit_code == 2, (result.exit_code, result.output)
    text = " ".join(result.output.split())
    assert "mp_rank_01/model_optim_rng.pt" in text and SAID[variant] in text, text
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_own_rank_files_without_sidecar_still_load(foreign_ranks, tmp_path, command):
    result = CliRunner().invoke(app, _command(command, foreign_ranks["good"], tmp_path))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def foreign_distcp(tmp_path_factory):
    """torch_dist without mzoo.yaml whose .distcp comes from a smaller or a larger model: the items
    .metadata places in the file do not begin and end where it says."""
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.ckpt.megatron.tracker import find_iteration_dir
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("foreign-distcp")
    out = {}
    for name, hidden in (("good", 64), ("small", 32), ("large", 128)):
        hf = make_hf_model(root / f"hf-{name}", LlamaConfig(**{**TINY, "hidden_size": hidden}), seed=hidden)
        out[name] = root / name
        convert(open_source(hf), out[name], Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2))))
        (out[name] / "mzoo.yaml").unlink()
    for name in ("small", "large"):
        copy = root / f"{name}-in-good"
        shutil.copytree(out["good"], copy)
        for f in find_iteration_dir(out[name])[0].glob("*.distcp"):
            shutil.copy(f, find_iteration_dir(copy)[0] / f.name)
        out[f"{name}-in-good"] = copy
    return out


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variant", ["small-in-good", "large-in-good"])
def test_distcp_from_another_model_is_refused(foreign_distcp, tmp_path, command, variant):
    """At open, before any tensor is read: `train --load --dry-run` used the larger model's file."""
    result = CliRunner().invoke(app, _command(command, foreign_distcp[variant], tmp_path))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "__0_0.distcp holds no torch archive where .metadata places" in text, text
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
