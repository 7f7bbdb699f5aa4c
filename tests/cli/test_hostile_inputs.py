"""Hostile input, table-driven: every command given something wrong exits 2 with one readable
sentence (one `error:` line, no traceback) and leaves no output behind, half-written or not."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import make_hf_model, make_moe_model
from transformers import LlamaConfig, MixtralConfig
from typer.testing import CliRunner

from mzoo.cli.main import app
from mzoo.layout import Layout

OUT = "OUT"  # placeholder for the destination each case must not create


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny real checkpoints and data files, and broken variants of them."""
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
    from mzoo.ckpt.megatron.checkpoint import Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("hostile")
    llama = make_hf_model(root / "llama", LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, max_position_embeddings=32))
    make_moe_model(root / "mixtral", MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=32,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             num_key_value_heads=2, num_local_experts=4,
                                                             max_position_embeddings=32))
    make_hf_model(root / "small-vocab", LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2))
    weights = llama / "model.safetensors"

    truncated = root / "truncated"
    shutil.copytree(llama, truncated)
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    bad_header = root / "bad-header"
    shutil.copytree(llama, bad_header)
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{not json at all, just noise!!!}"
    (bad_header / "model.safetensors").write_bytes(bytes(data))

    huge_header = root / "huge-header"
    shutil.copytree(llama, huge_header)
    data = bytearray(weights.read_bytes())
    data[0:8] = (10**15).to_bytes(8, "little")
    (huge_header / "model.safetensors").write_bytes(bytes(data))

    escaping = root / "escaping-index"
    shutil.copytree(llama, escaping)
    (escaping / "model.safetensors").rename(escaping / "model-00001-of-00001.safetensors")
    names = json.loads((llama / "config.json").read_text())  # any config: only the index matters here
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    (escaping / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../../etc/passwd" for k in keys}}))
    assert names

    unknown_type = root / "unknown-type"
    shutil.copytree(llama, unknown_type)
    cfg = json.loads((llama / "config.json").read_text())
    cfg["model_type"] = "bert"
    (unknown_type / "config.json").write_text(json.dumps(cfg))

    evil = root / "evil-legacy"
    convert(open_source(llama), evil, Target("torch", MegatronCheckpoint()))
    rank = evil / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank, weights_only=False)
    state["evil"] = Evil()
    torch.save(state, rank)
    (evil / "mzoo.yaml").unlink()  # edited after mzoo.yaml vouched for it (issue 17: its CRC-32 would refuse it)

    missing_shard = root / "missing-shard"
    convert(open_source(llama), missing_shard, Target("torch", MegatronCheckpoint(layout=Layout(tp=2))))
    shutil.rmtree(missing_shard / "release" / "mp_rank_01")

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)} | {"<unk>": 100}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="w0").save_pretrained(root / "tok")

    (root / "bad.yaml").write_text("name: x\nhidden_size: [1, 2\n")
    (root / "wrong-type.yaml").write_text("family: llama\nhidden_size: big\n")
    (root / "empty.jsonl").write_text("")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (root / "notjson.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    (root / "nokey.jsonl").write_text('{"prompt": "a"}\n')
    (root / "text.jsonl").write_text('{"text": "w1 w2 w3"}\n')
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "notes.txt").write_text("hello")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("mine")
    _readers_world(root, llama)  # issue 17: readers
    return root


def _readers_world(root, llama):
    """Issue 17 (readers): damaged Megatron checkpoints, trackers, a linked tokenizer, NaN weights."""
    import os

    from safetensors.torch import load_file, save_file

    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    def biggest_distcp(folder):
        return max(folder.rglob("*.distcp"), key=lambda p: p.stat().st_size)

    flipped = root / "flipped-distcp"
    convert(open_source(llama), flipped, Target("torch_dist", MegatronCheckpoint()))
    victim = biggest_distcp(flipped)
    data = bytearray(victim.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    victim.write_bytes(bytes(data))

    cut = root / "cut-distcp"
    convert(open_source(llama), cut, Target("torch_dist", MegatronCheckpoint()))
    (cut / "mzoo.yaml").unlink()  # a Megatron-LM checkpoint: no mzoo.yaml
    victim = biggest_distcp(cut)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)

    for name, tracker in (("garbage-tracker", b"banana\n"), ("tracker-to-nowhere", b"42\n")):
        convert(open_source(llama), root / name, Target("torch", MegatronCheckpoint()))
        (root / name / "latest_checkpointed_iteration.txt").write_bytes(tracker)

    linked = root / "linked-tokenizer"
    shutil.copytree(llama, linked)
    (root / "secret.txt").write_text("not a tokenizer")
    (linked / "tokenizer.json").unlink(missing_ok=True)
    os.symlink(root / "secret.txt", linked / "tokenizer.json")

    nan = root / "nan-weights"
    shutil.copytree(llama, nan)
    weights = nan / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(n for n in tensors if "layers.1.mlp.down_proj" in n)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})


CASES = {
    # zoo / init / configs
    "unknown preset": (["zoo", "show", "llama9"], "unknown preset"),
    "unknown family": (["zoo", "list", "--family", "bert"], "unknown family"),
    "malformed yaml": (["train", "{root}/bad.yaml", "--save", OUT], "not valid YAML"),
    "wrong type in yaml": (["train", "{root}/wrong-type.yaml", "--save", OUT], "hidden_size must be an integer"),
    "wrong type in override": (["train", "llama-tiny", "--override", "num_layers=two", "--save", OUT],
                               "num_layers must be an integer"),
    "unknown override key": (["train", "llama-tiny", "--override", "hiden_size=8", "--save", OUT], "did you mean"),
    "override not key=value": (["train", "llama-tiny", "--override", "num_layers", "--save", OUT], "key=value"),
    "init into a non-empty folder": (["init", "llama-tiny", "{root}/existing"], "exists"),
    "init bad dtype": (["init", "llama-tiny", OUT, "--dtype", "int8"], "unknown dtype"),
    # inconsistent parallel sizes
    "tp not dividing groups": (["train", "llama-tiny", "--tp", "3", "--save", OUT],
                               "does not divide the 2 query groups"),
    "pp beyond layers": (["train", "llama-tiny", "--pp", "64", "--save", OUT], "exceeds the"),
    "ep on a dense model": (["train", "llama-tiny", "--ep", "2", "--save", OUT], "mixture-of-experts"),
    "ep not dividing experts": (["convert", "hf->megatron", "{root}/mixtral", OUT, "--ep", "3"],
                                "does not divide the 4 experts"),
    "global batch not divisible": (["train", "llama-tiny", "--dp", "2", "--global-batch", "3", "--save", OUT],
                                   "not a multiple"),
    "zero tp": (["convert", "hf->megatron", "{root}/llama", OUT, "--tp", "0"], "at least 1"),
    # conversion arguments
    "unquoted arrow": (["convert", "hf-", "{root}/llama", OUT], "quote it"),
    "unknown direction": (["convert", "hf->onnx", "{root}/llama", OUT], "unknown direction"),
    "missing source": (["convert", "hf->megatron", "{root}/nope", OUT], "does not exist"),
    "not a checkpoint": (["convert", "hf->megatron", "{root}/not-a-checkpoint", OUT], "not a checkpoint"),
    "unknown megatron format": (["convert", "hf->megatron", "{root}/llama", OUT, "--megatron-format", "onnx"],
                                "unknown --megatron-format"),
    "bad shard size": (["convert", "megatron->hf", "{root}/evil-legacy", OUT, "--shard-size", "lots",
                        "--trust-pickle"], "cannot read size"),
    "wrong direction for source": (["convert", "megatron->hf", "{root}/llama", OUT], "not Megatron"),
    "destination exists": (["convert", "hf->megatron", "{root}/llama", "{root}/existing"], "exists"),
    # hostile files
    "truncated safetensors": (["convert", "hf->megatron", "{root}/truncated", OUT], "is truncated: it declares"),
    "corrupted safetensors header": (["convert", "hf->megatron", "{root}/bad-header", OUT], "unreadable header"),
    "absurd header length": (["inspect", "{root}/huge-header"], "truncated (header needs"),
    "index pointing outside": (["convert", "hf->megatron", "{root}/escaping-index", OUT], "outside"),
    "unsupported model_type": (["convert", "hf->megatron", "{root}/unknown-type", OUT], "model_type 'bert'"),
    "pickle with a disallowed global": (["convert", "megatron->hf", "{root}/evil-legacy", OUT], "--trust-pickle"),
    "missing rank file": (["convert", "megatron->hf", "{root}/missing-shard", OUT], "mp_rank_01"),
    "verify different vocabularies": (["verify", "{root}/llama", "{root}/small-vocab"], "different vocabularies"),
    "inspect a non-checkpoint": (["inspect", "{root}/not-a-checkpoint"], "not a checkpoint"),
    # data
    "empty data file": (["data", "prepare", "{root}/empty.jsonl", "--tokenizer", "{root}/tok", "--out", OUT],
                        "no documents with text"),
    "binary data file": (["data", "prepare", "{root}/binary.jsonl", "--tokenizer", "{root}/tok", "--out", OUT],
                         "not valid JSON (not UTF-8)"),
    "missing tokenizer": (["data", "prepare", "{root}/notjson.jsonl", "--tokenizer", "{root}/nope", "--out", OUT],
                          "does not exist; pass --tokenizer"),
    "folder without a tokenizer": (["finetune", "{root}/llama", "--data", "{root}/text.jsonl", "--format", "text",
                                    "--tokenizer", "{root}/llama", "--save", OUT], "holds no tokenizer"),
    "finetune line not json": (["finetune", "{root}/llama", "--data", "{root}/notjson.jsonl", "--format",
                                "prompt-completion", "--tokenizer", "{root}/tok", "--save", OUT],
                               "notjson.jsonl:2 is not valid JSON"),
    "finetune missing key": (["finetune", "{root}/llama", "--data", "{root}/nokey.jsonl", "--format",
                              "prompt-completion", "--save", OUT], "nokey.jsonl:1 lacks the key 'completion'"),
    "finetune without tokenizer": (["finetune", "{root}/llama", "--data", "{root}/text.jsonl", "--format",
                                    "text", "--save", OUT], "no tokenizer"),
    # generate / push
    "prompt longer than context": (["generate", "{root}/llama", "--prompt-ids", ",".join(["1"] * 40)],
                                   "the model's context is 32"),
    "prompt id outside vocabulary": (["generate", "{root}/llama", "--prompt-ids", "1,500"], "outside the vocabulary"),
    "invalid repo id": (["push", "{root}/llama", "not a/valid--repo", "--dry-run"], "repository id"),
    "push without a token": (["push", "{root}/llama", "org/name", "--token-env", "MZOO_NO_SUCH_TOKEN"],
                             "environment variable is not set"),
    # --- issue 17: validate ---
    "micro batch zero": (["train", "llama-tiny", "--mock-data", "--micro-batch", "0", "--save", OUT],
                         "--micro-batch must be at least 1"),
    "global batch zero": (["train", "llama-tiny", "--mock-data", "--global-batch", "0", "--save", OUT],
                          "--global-batch must be at least 1"),
    "seq len zero": (["train", "llama-tiny", "--mock-data", "--seq-len", "0", "--save", OUT], "--seq-len must be"),
    "lr nan": (["train", "llama-tiny", "--mock-data", "--lr", "nan", "--save", OUT], "--lr must be a finite number"),
    "steps negative": (["train", "llama-tiny", "--mock-data", "--steps", "-1", "--save", OUT], "--steps must be"),
    "verify batch zero": (["verify", "{root}/llama", "{root}/llama", "--batch", "0"], "--batch must be at least 1"),
    "top p out of range": (["generate", "{root}/llama", "--prompt-ids", "1,2", "--top-p", "1.5"],
                           "--top-p must be above 0"),
    "valid fraction 1": (["finetune", "{root}/llama", "--data", "{root}/text.jsonl", "--valid-fraction", "1",
                          "--save", OUT], "--valid-fraction must be"),
    "brackets in a path": (["inspect", "{root}/[/nope]"], "[/nope] does not exist"),
    # --- issue 17: readers ---
    "flipped byte in a .distcp with mzoo.yaml": (["convert", "megatron->hf", "{root}/flipped-distcp", OUT],
                                                 "does not match the CRC-32 mzoo.yaml recorded"),
    "half-truncated .distcp without mzoo.yaml": (["convert", "megatron->hf", "{root}/cut-distcp", OUT],
                                                 "is truncated: it ends at byte"),
    "tracker holding garbage": (["inspect", "{root}/garbage-tracker"], "not an iteration number or 'release'"),
    "tracker naming a missing iteration": (["inspect", "{root}/tracker-to-nowhere"],
                                           "points at iter_0000042, which does not exist"),
    "tokenizer linked out of the folder": (["convert", "hf->hf", "{root}/linked-tokenizer", OUT],
                                           "refusing to read it: copy the file into the folder"),
    "NaN weights": (["convert", "hf->megatron", "{root}/nan-weights", OUT], "holds NaN or Inf values"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_sentence_and_writes_nothing(world, tmp_path, case, monkeypatch):
    args, message = CASES[case]
    out = tmp_path / "out"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file either
    monkeypatch.chdir(tmp_path)
    argv = [a.replace(OUT, str(out)).format(root=world) for a in args]
    before = sorted(p.name for p in world.iterdir())
    result = CliRunner().invoke(app, argv)
    text = result.output
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{text}\n{result.exception!r}"
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert message in text, text
    assert message in errors[0], text  # the error sentence itself names the problem
    assert _is_one_sentence(errors[0].removeprefix("error: ")), errors[0]
    assert not list(tmp_path.glob("out*")), f"{case} left {list(tmp_path.glob('out*'))}"
    assert sorted(p.name for p in world.iterdir()) == before  # nothing written next to the inputs
    assert not list(tmp_path.glob("*.mzoo-tmp*"))
    assert (world / "existing" / "keep.txt").read_text() == "mine"


def _is_one_sentence(text: str) -> bool:
    """Ends like a sentence and starts no second one ('e.g. mzoo' is fine, '. Then' is not)."""
    return text[-1:] in ".?!" and not re.search(r"[.?!]\s+[A-Z(]", text)


def test_the_table_has_thirty_distinct_specific_cases():
    """A table padded with repeated rows, or with messages any failure (or an echo of the input)
    would print, guards nothing."""
    assert len(CASES) >= 30
    argvs = [tuple(args) for args, _ in CASES.values()]
    assert len(set(argvs)) == len(argvs), "two cases run the same command line"
    pairs = [(args[0], message) for args, message in CASES.values()]
    assert len(set(pairs)) == len(pairs), "two cases of one command expect the same message"
    for case, (args, message) in CASES.items():
        assert len(message) >= 6 and "error" not in message.lower(), (case, message)
        assert message.lower() not in " ".join(args).lower(), f"{case}: {message!r} merely echoes the input"
    assert _is_one_sentence("the prompt is empty; give some text.") and _is_one_sentence("did you mean x?")
    assert not _is_one_sentence("the prompt is empty. Give some text.") and not _is_one_sentence("no period")
