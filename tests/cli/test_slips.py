"""Issue 17, case 17: layout and reporting slips (reshard keeps what it is not asked to change, resume
says what it did, one output policy, splits, verify's default, plan --check's exit codes)."""

from __future__ import annotations

import json

import pytest

from informative import informative_init
from test_cli import mzoo


def test_reshard_keeps_every_axis_and_the_format_it_is_not_asked_to_change(tmp_path):
    hf, legacy, out = (tmp_path / n for n in ("hf", "legacy", "out"))
    informative_init("mixtral-tiny", hf)
    mzoo("convert", "hf->megatron", hf, legacy, "--tp", "2", "--megatron-format", "torch", "--spec", "local")
    mzoo("reshard", legacy, out, "--ep", "4", "--quiet")
    info = json.loads(mzoo("inspect", out, "--json").stdout)
    assert (info["format"], info["tp"], info["pp"], info["ep"], info["spec"]) == ("torch", 2, 1, 4, "local")
    back = tmp_path / "back"
    mzoo("reshard", out, back, "--tp", "1", "--megatron-format", "torch_dist", "--quiet")
    info = json.loads(mzoo("inspect", back, "--json").stdout)
    assert (info["format"], info["tp"], info["ep"], info["spec"]) == ("torch_dist", 1, 4, "local")


TINY = ("--mock-data", "--seq-len", "16", "--micro-batch", "1", "--global-batch", "1", "--device", "cpu")


def _trained(tmp_path, steps: int = 2):
    ckpt = tmp_path / "ckpt"
    mzoo("train", "gpt-tiny", *TINY, "--steps", str(steps), "--save", ckpt)
    return ckpt


def test_resume_at_the_target_says_so_and_a_lower_target_is_refused(tmp_path):
    ckpt = _trained(tmp_path)
    before = sorted(p.name for p in ckpt.iterdir())
    out = mzoo("train", "gpt-tiny", *TINY, "--steps", "2", "--load", ckpt, "--save", ckpt)
    assert "already at step 2 (the target); nothing to train" in out.stdout
    data = json.loads(mzoo("train", "gpt-tiny", *TINY, "--steps", "2", "--load", ckpt, "--json").stdout)
    assert data["nothing_to_train"] is True
    mtime = (ckpt / "iter_0000002").stat().st_mtime_ns
    low = mzoo("train", "gpt-tiny", *TINY, "--steps", "1", "--load", ckpt, "--save", ckpt, check=False)
    assert low.returncode == 2 and "--steps 1 is below step 2" in low.stderr and "Traceback" not in low.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before and (ckpt / "iter_0000002").stat().st_mtime_ns == mtime


def test_load_says_what_it_loaded(tmp_path):
    ckpt = _trained(tmp_path)
    out = mzoo("train", "gpt-tiny", *TINY, "--steps", "3", "--load", ckpt)
    assert f"loaded {ckpt}: torch_dist iteration 2, step 2, tp=1 pp=1 vpp=1 ep=1" in out.stdout
    data = json.loads(mzoo("train", "gpt-tiny", *TINY, "--steps", "3", "--load", ckpt, "--json").stdout)
    assert data["loaded"] == {"path": str(ckpt), "format": "torch_dist", "iteration": 2, "step": 2,
                              "layout": {"tp": 1, "pp": 1, "vpp": 1, "ep": 1}}


def test_step_lines_and_summary_go_to_stdout_json_alone(tmp_path):
    out = mzoo("train", "gpt-tiny", *TINY, "--steps", "2", "--save", tmp_path / "c")
    assert "step    1  loss" in out.stdout and "step    2  loss" in out.stdout and "saved" in out.stdout
    assert "loss" not in out.stderr
    data = json.loads(mzoo("train", "gpt-tiny", *TINY, "--steps", "2", "--json").stdout)  # nothing else on stdout
    assert len(data["losses"]) == 2


def _corpus(tmp_path, documents: int = 500):
    """A Megatron indexed dataset of `documents` short documents (what `mzoo data prepare` writes)."""
    import numpy as np

    from mzoo.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(documents):
            w.add_document(rng.integers(0, 1000, 20))
    return prefix


def test_default_split_trains_a_small_corpus_when_no_evaluation_is_asked(tmp_path):
    data = _corpus(tmp_path)  # 969,30,1 of 500 documents leaves the test split empty
    args = ("train", "gpt-tiny", "--data", data, "--seq-len", "16", "--micro-batch", "1", "--global-batch", "1",
            "--device", "cpu", "--steps", "2")
    out = mzoo(*args, "--json")
    assert len(json.loads(out.stdout)["losses"]) == 2
    for split in ("1000,0,0", "999,1,0"):  # no share; a share of no document
        asked = mzoo(*args, "--split", split, "--eval-interval", "1", check=False)
        assert asked.returncode == 2 and "Traceback" not in asked.stderr
        assert "the valid split" in asked.stderr and "is empty" in asked.stderr and "--split" in asked.stderr


def test_plan_check_exit_codes_are_the_ones_its_help_documents():
    """0: the layout is valid and fits; 1: valid but does not fit; 2: not valid for this model and GPU
    count, or --check is malformed (stated in --help)."""
    help_text = " ".join(mzoo("plan", "--help").stdout.split())
    assert "0 when --check's layout is valid and fits" in help_text
    assert "1 when it is valid but does not fit" in help_text and "2 when it is not valid" in help_text
    base = ("plan", "llama3-8b", "--gpus", "8", "--check")
    assert mzoo(*base, "tp=8").returncode == 0
    assert mzoo(*base, "tp=1,pp=1", check=False).returncode == 1  # 8B unsharded over DP: 81 GiB on 80
    for invalid in ("tp=3,dp=1", "tp=7", "ep=2", "tpp=1"):  # query groups; the GPU count; dense; malformed
        proc = mzoo(*base, invalid, check=False)
        assert proc.returncode == 2, invalid


def test_verify_default_catches_one_corrupted_embedding_row(tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mzoo.jobs.verify import sample_tokens

    a, b = tmp_path / "a", tmp_path / "b"
    informative_init("llama-tiny", a)
    shutil.copytree(a, b)
    (shard,) = b.glob("*.safetensors")
    tensors = load_file(shard)
    emb = tensors["model.embed_tokens.weight"]
    unseen = sorted(set(range(emb.shape[0])) - set(sample_tokens(emb.shape[0]).flatten().tolist()))[0]
    emb[unseen] += 0.5  # a row the default's random tokens never read
    save_file(tensors, shard, metadata={"format": "pt"})
    (b / "mzoo.yaml").unlink()  # no recorded checksums: only the comparison can tell
    proc = mzoo("verify", a, b, "--json", check=False)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1 and data["match"] is False
    assert data["worst_tensor"] == "embedding.word_embeddings.weight" and data["max_tensor_diff"] == 0.5
    same = json.loads(mzoo("verify", a, a, "--json").stdout)
    assert same["match"] and same["max_tensor_diff"] == 0.0 and same["tensors"] > 0


def test_json_output_is_strict_json_when_a_difference_is_infinite(capsys):
    """verify's max_tensor_diff is inf for a missing tensor: --json writes null, never `Infinity`."""
    from mzoo.cli.common import print_json

    print_json({"max_tensor_diff": float("inf"), "rows": [float("nan"), 1.5]})
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"max_tensor_diff": None, "rows": [None, 1.5]}


# ---- finetune reports what it loaded and what a stop saved ------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """llama-tiny as a Hugging Face folder with a word-level tokenizer, and prompt-completion data."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from test_sft import make_tokenizer  # the word-level tokenizer the finetuning tests use

    root = tmp_path_factory.mktemp("ft-slips")
    informative_init("llama-tiny", root / "model")
    make_tokenizer(root / "model")
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": "w1 w2 w3", "completion": "w3 w2 w1"}) + "\n"
                                              for _ in range(16)))
    return root


FT = ("--format", "prompt-completion", "--seq-len", "16", "--micro-batch", "1", "--global-batch", "2",
      "--device", "cpu")


def test_finetune_says_what_it_loaded(base, tmp_path):
    """The same line as train's --load (weights only: finetuning starts a new schedule), and in --json."""
    args = ("finetune", base / "model", "--data", base / "train.jsonl", *FT, "--steps", "1")
    out = mzoo(*args)
    assert f"loaded {base / 'model'}: hf, weights only, tp=1 pp=1 vpp=1 ep=1" in out.stdout, out.stdout
    data = json.loads(mzoo(*args, "--json").stdout)
    assert data["loaded"] == {"path": str(base / "model"), "format": "hf", "iteration": "release", "step": None,
                              "layout": {"tp": 1, "pp": 1, "vpp": 1, "ep": 1}}


def test_sigterm_during_finetune_names_the_hugging_face_folder_it_saved(base, tmp_path):
    """A stopped finetune with an HF --save wrote a weights-only folder, not a Megatron iteration that
    --load resumes: the sentence says so, with the step it holds."""
    import re
    import signal
    import subprocess

    from test_signals import MZOO, outcome, wait_training

    err = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([MZOO, "finetune", str(base / "model"), "--data", str(base / "train.jsonl"), *FT,
                             "--steps", "100000", "--save", "ft", "--log-json", "log.jsonl"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    wait_training(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, text = outcome(proc, tmp_path)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    said = re.search(r"stopped by SIGTERM at step (\d+); saved the model at step (\d+) as a Hugging Face folder "
                     r"to ft \(weights only\)\.", " ".join(text.split()))
    assert said and said[1] == said[2], text[-3000:]
    assert "saved iteration" not in text and "--load" not in text and "Traceback" not in text
    assert (tmp_path / "ft" / "config.json").exists()
    assert not (tmp_path / "ft" / "latest_checkpointed_iteration.txt").exists()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) >= int(said[1])
