"""`mzoo push`: the staging folder is a model transformers loads and `mzoo verify` matches to its
Megatron source; uploads go through huggingface_hub's real HfApi to a local server that speaks the
Hub's upload protocol (tests/hub_server.py); bad input fails with one sentence before anything
is uploaded or staged. No test reaches the real Hub.

huggingface_hub uploads through Xet (a separate CAS service) whenever hf_xet is installed; the
fake hub speaks the HTTP LFS protocol, so these tests set huggingface_hub's own switch
HF_HUB_DISABLE_XET (see docs/push.md)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_hf_model
from hub_server import FakeHub

from mzoo.layout import Layout

TOKEN = "hf_TestSecret0123456789abcdef"
TEXT = "the quick brown fox jumps over a lazy dog while seven tiny models learn to predict tokens"


def mzoo(*args):
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_sentence(r) -> str:
    """The error line (after any 'retrying:' notices): exit 2, one sentence, no traceback, no token."""
    err = "\n".join(x for x in r.stderr.strip().splitlines() if not x.startswith("retrying: "))
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: "), err
    assert TOKEN not in r.stdout + r.stderr
    return err


# ---- checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF llama with its own BPE tokenizer, and that model as Megatron torch_dist TP2 (no tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint
    from mzoo.ckpt.megatron.checkpoint import Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("push")
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    hf = make_hf_model(root / "hf", cfg)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(root / "tok")
    for f in (root / "tok").iterdir():
        shutil.copy(f, hf / f.name)
    convert(open_source(hf), root / "mcore", Target("torch_dist", MegatronCheckpoint(layout=Layout(tp=2))))
    return {"hf": hf, "mcore": root / "mcore", "tok": root / "tok", "root": root}


@pytest.fixture
def env(monkeypatch, tmp_path) -> Path:
    """An isolated environment: HF_TOKEN set, no token file, temporary staging under tmp_path/tmp
    (returned, to check that nothing is left behind), fast retries, huggingface_hub online + LFS."""
    import huggingface_hub
    from huggingface_hub import constants

    from mzoo.jobs import push as push_cmd
    from mzoo.hub import RetryPolicy

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(push_cmd, "RETRY", RetryPolicy(attempts=4, base_seconds=0.01, max_seconds=0.05))
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    huggingface_hub.close_session()  # a fresh HTTP client that sees NO_PROXY
    return temp


@pytest.fixture
def hub(env):
    with FakeHub(tokens={TOKEN: {"me", "my-org"}, "hf_other": {"me"}}) as h:
        yield h


# ---- (a) the staging folder -----------------------------------------------------------------------------
def test_staging_from_megatron_loads_in_transformers_and_verifies(ckpts, env, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mzoo.params import count_params
    from mzoo.jobs.sources import open_source

    monkeypatch.delenv("HF_TOKEN")  # --dry-run needs no token
    stage = tmp_path / "stage"
    r = mzoo("push", ckpts["mcore"], "my-org/tiny-llama", "--dry-run", "--staging", stage, "--tokenizer", ckpts["tok"],
             "--license", "apache-2.0", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    on_disk = {p.relative_to(stage).as_posix(): p.stat().st_size for p in stage.rglob("*") if p.is_file()}
    assert {f["path"]: f["bytes"] for f in out["files"]} == on_disk
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "mzoo.yaml"} <= set(on_disk)
    assert out["commit"] is None and out["dry_run"] and out["staging"] == str(stage)

    model = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(stage)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] > 3 and int(ids.max()) < model.config.vocab_size
    original = AutoModelForCausalLM.from_pretrained(ckpts["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)  # fp32 all the way: bit-exact
    v = mzoo("verify", stage, ckpts["mcore"], "--json")
    assert v.exit_code == 0 and json.loads(v.stdout)["match"], v.stdout

    card = (stage / "README.md").read_text()
    assert card == out["card"]
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["mzoo", "llama", "megatron"]}
    total = count_params(open_source(ckpts["mcore"]).cfg).total
    assert f"| total | {total:,} |" in card and "| layers | 2 |" in card and "| query groups (KV heads) | 2 |" in card
    assert "Megatron `torch_dist` checkpoint (TP 2, PP 1" in card
    assert 'AutoTokenizer.from_pretrained("my-org/tiny-llama")' in card
    assert not any(env.iterdir())


def test_dry_run_prints_files_and_card_and_leaves_no_temporary_staging(ckpts, env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    r = mzoo("push", ckpts["hf"], "my-org/tiny-hf", "--dry-run", "--base-model", "my-org/parent")
    assert r.exit_code == 0, r.stderr
    for f in ckpts["hf"].iterdir():
        line = next(x for x in r.stdout.splitlines() if x.strip().startswith(f.name + " "))
        assert line.split()[-1] == f"{f.stat().st_size:,}"
    assert "README.md" in r.stdout and "staging folder: removed" in r.stdout
    assert "base_model: my-org/parent" in r.stdout and "Uploaded as is from a Hugging Face" in r.stdout
    assert not any(env.iterdir())


def test_card_reports_training_moe_and_base_model(tmp_path):
    from mzoo.jobs.card import CardFacts, front_matter, known_base_model, render_card, training_facts
    from mzoo.params import count_params
    from mzoo.zoo import resolve

    root = tmp_path / "ckpt"
    (root / "iter_0000030").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("30\n")
    (root / "iter_0000030" / "mzoo_train_state.json").write_text(json.dumps({"step": 30, "consumed_samples": 240}))
    (root / "mzoo.yaml").write_text(yaml.safe_dump({"training": {"data": ["data/corpus_text_document"],
                                                                  "seq_length": 64}, "base_model": "org/base"}))
    t = training_facts(root, "torch_dist", 30)
    assert (t.steps, t.consumed_samples, t.tokens, t.data) == (30, 240, 240 * 64, ("data/corpus_text_document",))
    assert known_base_model(root, "torch_dist", None) == "org/base"
    assert known_base_model(root, "torch_dist", "me/given") == "me/given"

    cfg = resolve("mixtral-tiny")
    facts = CardFacts("me/moe", cfg, "bfloat16", "torch_dist", {"tp": 1, "pp": 2, "vpp": 1, "ep": 2, "spec": "te"}, 30,
                      training=t, base_model="org/base")
    card = render_card(facts)
    count = count_params(cfg)
    assert count.active < count.total and f"| active per token | {count.active:,} |" in card
    assert front_matter(facts)["tags"] == ["mzoo", cfg.family, "moe", "megatron"]
    assert front_matter(facts)["base_model"] == "org/base"
    assert "- steps: 30" in card and "- consumed samples: 240" in card and "`data/corpus_text_document`" in card
    assert f"{cfg.moe.num_experts} routed, top-{cfg.moe.top_k}" in card and "EP 2" in card
    assert "AutoTokenizer" not in card  # no tokenizer published: the snippet does not pretend there is one


# ---- (b) uploads against the fake hub -------------------------------------------------------------------
def test_push_uploads_every_file_with_the_token_and_repeats(ckpts, hub, env, tmp_path):
    stage = tmp_path / "stage"
    r = mzoo("push", ckpts["mcore"], "my-org/tiny", "--endpoint", hub.url, "--private", "--tokenizer", ckpts["tok"],
             "--staging", stage, "--commit-message", "first upload")
    assert r.exit_code == 0, r.stderr
    assert TOKEN not in r.stdout + r.stderr
    arrived = hub.files("my-org/tiny")
    local = {p.relative_to(stage).as_posix(): p for p in stage.rglob("*") if p.is_file()}
    assert set(arrived) == set(local) | {".gitattributes"}
    for name, path in local.items():
        assert hashlib.sha256(arrived[name]).hexdigest() == _sha(path), name
    repo = hub.repos["my-org/tiny"]
    assert repo.private
    assert hub.create_payloads[0] == {"name": "tiny", "organization": "my-org", "visibility": "private"}
    assert repo.branches["main"]["model.safetensors"].lfs and not repo.branches["main"]["config.json"].lfs
    assert _sha(stage / "model.safetensors") in hub.lfs and repo.commits[-1].summary == "first upload"
    for s in hub.seen:  # the token on every API call; never on the presigned storage PUT
        assert s.authorization == (None if s.method == "PUT" else f"Bearer {TOKEN}"), s
    assert [s.method for s in hub.seen].count("PUT") == 1
    assert not any(env.iterdir())

    # a repeat push with a new card: one commit with README.md only, no LFS bytes sent again
    before = len(hub.seen)
    r = mzoo("push", ckpts["mcore"], "my-org/tiny", "--endpoint", hub.url, "--tokenizer", ckpts["tok"], "--license",
             "mit", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert repo.commits[-1].paths == ["README.md"] and out["commit"]["oid"] == repo.commits[-1].oid
    assert "license: mit" in hub.files("my-org/tiny")["README.md"].decode()
    assert "PUT" not in [s.method for s in hub.seen[before:]] and out["staging"] is None
    # identical again: nothing to commit, the current commit is reported
    n = len(repo.commits)
    r = mzoo("push", ckpts["mcore"], "my-org/tiny", "--endpoint", hub.url, "--tokenizer", ckpts["tok"], "--license",
             "mit", "--json")
    assert r.exit_code == 0 and len(repo.commits) == n and json.loads(r.stdout)["commit"]["oid"] == repo.commits[-1].oid
    assert not any(env.iterdir())


def test_push_to_a_new_branch_with_token_env_and_token_file(ckpts, hub, env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    r = mzoo("push", ckpts["hf"], "my-org/tiny-hf", "--endpoint", hub.url, "--revision", "exp/v1", "--token-env",
             "MY_TOKEN")
    assert r.exit_code == 0, r.stderr
    repo = hub.repos["my-org/tiny-hf"]
    assert set(repo.branches["main"]) == {".gitattributes"}  # main untouched; the branch has the model
    branch = hub.files("my-org/tiny-hf", "exp/v1")
    for f in ckpts["hf"].iterdir():
        assert hashlib.sha256(branch[f.name]).hexdigest() == _sha(f)
    assert 'revision="exp/v1"' in branch["README.md"].decode()
    assert not repo.private and "visibility" not in hub.create_payloads[0]

    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "token"))
    r = mzoo("push", ckpts["hf"], "my-org/tiny-hf", "--endpoint", hub.url, "--license", "mit")
    assert r.exit_code == 0, r.stderr
    assert hub.seen[-1].authorization == f"Bearer {TOKEN}" and "README.md" in hub.files("my-org/tiny-hf")


def test_installed_command_in_a_subprocess(ckpts, hub, tmp_path):
    """The real entry point, configured only through the environment (HF_TOKEN, HF_ENDPOINT and
    huggingface_hub's own HF_HUB_DISABLE_XET): no monkeypatching in the process that uploads."""
    temp = tmp_path / "subprocess-tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_TOKEN=TOKEN, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"),
               NO_PROXY="127.0.0.1", TMPDIR=str(temp))
    proc = subprocess.run([str(Path(sys.executable).with_name("mzoo")), "push", ckpts["hf"], "me/tiny", "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert TOKEN not in proc.stdout + proc.stderr and out["url"] == f"{hub.url}/me/tiny"
    assert out["commit"]["oid"] == hub.repos["me/tiny"].commits[-1].oid
    for f in ckpts["hf"].iterdir():
        assert hashlib.sha256(hub.files("me/tiny")[f.name]).hexdigest() == _sha(f)
    assert not any(temp.iterdir())  # the temporary staging folder is gone


@pytest.mark.parametrize("case", ["401", "403", "404-endpoint", "404-org"])
def test_hub_refusals_are_one_sentence_and_upload_nothing(ckpts, hub, env, monkeypatch, case):
    repo, endpoint = "my-org/tiny", hub.url
    if case == "401":
        monkeypatch.setenv("HF_TOKEN", TOKEN + "x")  # not a token the hub knows; it contains TOKEN, never printed
    elif case == "403":
        repo = "their-org/tiny"
    elif case == "404-endpoint":
        endpoint = hub.url + "/not-a-hub"
    else:
        repo = "no-such-org/tiny"
    err = _one_sentence(mzoo("push", ckpts["hf"], repo, "--endpoint", endpoint))
    expected = {"401": "rejected the token from HF_TOKEN (401 Unauthorized)",
                "403": "may not write to their-org/tiny (403 Forbidden)",
                "404-endpoint": "answered 404 Not Found while checking the token",
                "404-org": "answered 404 Not Found while creating no-such-org/tiny"}[case]
    assert expected in err, err
    assert hub.uploads() == [] and hub.repos == {} and not any(env.iterdir())


def test_refusal_after_staging_removes_the_staging_folder(ckpts, hub, env):
    hub.add_repo("their-org/shared")  # readable, not writable: create_repo(exist_ok) passes, the upload is refused
    err = _one_sentence(mzoo("push", ckpts["mcore"], "their-org/shared", "--endpoint", hub.url))
    assert "may not write to their-org/shared (403 Forbidden) while uploading" in err
    assert set(hub.files("their-org/shared")) == {".gitattributes"} and not any(env.iterdir())


def test_private_push_to_an_existing_public_repo_is_refused(ckpts, hub, env):
    hub.add_repo("my-org/public")
    err = _one_sentence(mzoo("push", ckpts["hf"], "my-org/public", "--endpoint", hub.url, "--private"))
    assert "my-org/public already exists and is public" in err
    assert hub.uploads() == [] and set(hub.files("my-org/public")) == {".gitattributes"} and not any(env.iterdir())


def test_transient_failures_are_retried(ckpts, hub, env):
    hub.fail("POST", r"^/api/repos/create$", None)  # connection dropped without an answer
    hub.fail("POST", r"/commit/main$", 503, times=2)
    r = mzoo("push", ckpts["hf"], "my-org/tiny", "--endpoint", hub.url)
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("retrying:") == 3 and "the hub answered 503 while uploading to my-org/tiny" in r.stderr
    assert [s.path for s in hub.seen].count("/api/models/my-org/tiny/commit/main") == 3
    assert len(hub.repos["my-org/tiny"].commits) == 2  # initial + exactly one upload commit
    for f in ckpts["hf"].iterdir():
        assert hashlib.sha256(hub.files("my-org/tiny")[f.name]).hexdigest() == _sha(f)

    hub.fail("POST", r"/commit/main$", 503, times=10)  # bounded: gives up after RETRY.attempts
    err = _one_sentence(mzoo("push", ckpts["hf"], "my-org/tiny", "--endpoint", hub.url, "--license", "mit"))
    assert "answered 503" in err and "after 4 attempts" in err and not any(env.iterdir())


# ---- (c) bad input: one sentence, before anything is staged or sent ---------------------------------------
@pytest.mark.parametrize("repo_id, message", [
    ("tiny", "must be ORG/NAME"),
    ("my-org/tiny/extra", "must be ORG/NAME"),
    ("my-org/", "must be ORG/NAME"),
    ("my-org/-tiny", "may only use letters"),
    ("my-org/tiny.", "may only use letters"),
    ("my org/tiny", "may only use letters"),
    ("my-org/tïny", "may only use letters"),
    ("my-org/ti--ny", "contains '--' or '..'"),
    ("my-org/ti..ny", "contains '--' or '..'"),
    ("my-org/" + "x" * 97, "longer than the Hub's 96 characters"),
    ("my-org/tiny.git", "may not end in '.git'"),
])
def test_invalid_repo_ids(ckpts, hub, env, repo_id, message):
    assert message in _one_sentence(mzoo("push", ckpts["hf"], repo_id, "--endpoint", hub.url))
    assert hub.seen == [] and not any(env.iterdir())


@pytest.fixture(scope="module")
def broken(ckpts) -> dict[str, Path]:
    """Incomplete copies: a deleted torch_dist shard, a deleted HF shard, a truncated file mzoo.yaml records."""
    from mzoo.ckpt.megatron.checkpoint import Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = ckpts["root"] / "broken"
    shutil.copytree(ckpts["mcore"], root / "mcore-missing")
    next((root / "mcore-missing").glob("release/*.distcp")).unlink()
    convert(open_source(ckpts["hf"]), root / "hf-sharded", Target("hf", max_shard_bytes=100_000))
    shards = sorted((root / "hf-sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    shutil.copytree(ckpts["mcore"], root / "mcore-truncated")
    with open(root / "mcore-truncated" / "release" / "__0_0.distcp", "ab") as f:
        f.write(b"\0" * 7)  # still readable, but no longer the size mzoo.yaml recorded
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("name, message", [
    ("mcore-missing", ".distcp"),
    ("hf-sharded", ".safetensors"),
    ("mcore-truncated", "release/__0_0.distcp has "),
])
def test_incomplete_checkpoints(broken, hub, env, name, message):
    err = _one_sentence(mzoo("push", broken[name], "my-org/tiny", "--endpoint", hub.url))
    assert message in err, err
    assert hub.seen == [] and not any(env.iterdir())


@pytest.mark.parametrize("extra, message", [
    ([], "no Hugging Face token found: set HF_TOKEN"),
    (["--token-env", "UNSET_TOKEN_VAR"], "--token-env UNSET_TOKEN_VAR: that environment variable is not set"),
    (["--token-env", "hf_abc"], None),  # a token pasted where the variable name goes: not echoed either
    (["--license", "apache"], "--license 'apache' is not a Hub license identifier (did you mean apache-2.0?)"),
    (["--revision", "refs/heads/x"], "is not a branch name"),
    (["--revision", "a..b"], "is not a branch name"),
    (["--endpoint", "ftp://example.com"], "is not an http(s) URL"),
    (["--base-model", "just-a-name"], "--base-model 'just-a-name' must be ORG/NAME"),
    (["--commit-message", " "], "--commit-message is empty"),
    (["--tokenizer", "."], "holds no tokenizer.json"),
])
def test_bad_options_and_missing_token(ckpts, hub, env, monkeypatch, tmp_path, extra, message):
    if not extra or extra[0] == "--token-env":
        monkeypatch.delenv("HF_TOKEN")  # the token checks themselves
    args = ["--endpoint", hub.url] if "--endpoint" not in extra else []
    err = _one_sentence(mzoo("push", ckpts["hf"], "my-org/tiny", *args, *extra))
    if message:
        assert message in err, err
    else:
        assert "hf_abc" not in err and "'hf_...'" in err
    assert hub.seen == [] and not any(env.iterdir())


def test_tokenizer_larger_than_the_vocabulary_is_refused(ckpts, hub, env, tmp_path):
    big = tmp_path / "big-tokenizer"
    shutil.copytree(ckpts["tok"], big)
    data = json.loads((big / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 500, "content": "<extra>", "special": True})
    (big / "tokenizer.json").write_text(json.dumps(data))
    err = _one_sentence(mzoo("push", ckpts["mcore"], "my-org/tiny", "--endpoint", hub.url, "--tokenizer", big))
    assert "has ids up to 500 but the model's vocabulary has 128 rows" in err
    assert hub.seen == [] and not any(env.iterdir())


def test_existing_staging_folder_and_offline_mode(ckpts, hub, env, monkeypatch, tmp_path):
    from huggingface_hub import constants

    (tmp_path / "stage").mkdir()
    err = _one_sentence(mzoo("push", ckpts["hf"], "my-org/tiny", "--endpoint", hub.url, "--staging",
                             tmp_path / "stage"))
    assert "--staging" in err and "already exists" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in _one_sentence(mzoo("push", ckpts["hf"], "my-org/tiny", "--endpoint", hub.url))
    assert hub.seen == [] and not any(env.iterdir())


def test_help_has_an_example():
    r = mzoo("push", "--help")
    assert r.exit_code == 0 and "Example: mzoo push" in r.stdout and "--dry-run" in r.stdout
