"""Issue 17, case 10: sizes in configs are bounded before anything is allocated.

An absurd layer count in config.json or mzoo.yaml is checked against the layers the weight files
hold (one sentence naming both numbers); anything that would build a model estimates its bytes from
the config first and refuses when the machine cannot hold them; one huge JSONL line does not take
`mzoo data prepare` to gigabytes. Each command runs in a child process under an address-space cap
(RLIMIT_AS) and a per-command alarm, so the old behaviour (minutes of work, MemoryError) fails the
test instead of hanging or swapping the machine."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_hf_model
from transformers import LlamaConfig

CAP_GIB = 3.0  # address space of the child: torch alone maps ~1 GiB
ALARM_S = 20  # per command; the fixed commands answer in well under a second after import

HUGE_LAYERS = 10_000_000

CHILD = r"""
import json, signal, sys
from typer.testing import CliRunner
from mzoo.cli.main import app

class Alarm(Exception):
    pass

def ring(*_):
    raise Alarm()

signal.signal(signal.SIGALRM, ring)
out = []
for argv in json.loads(sys.argv[1]):
    signal.alarm(int(sys.argv[2]))
    try:
        r = CliRunner().invoke(app, argv, catch_exceptions=True)
        exc = r.exception if not isinstance(r.exception, SystemExit) else None
        out.append({"code": r.exit_code, "output": r.output, "exception": repr(exc) if exc else None})
    except Alarm:
        out.append({"code": "timeout", "output": "", "exception": None})
    finally:
        signal.alarm(0)
print("RESULTS" + json.dumps(out))
"""


def run_capped(commands: list[list[str]], cap_gib: float = CAP_GIB, alarm_s: int = ALARM_S) -> list[dict]:
    """Run each mzoo command line in one child process capped at `cap_gib` of address space."""
    cap = int(cap_gib * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    argv = [[str(a) for a in c] for c in commands]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), str(alarm_s)], preexec_fn=limit,
                          capture_output=True, text=True, timeout=alarm_s * len(commands) + 120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[0].removeprefix("RESULTS"))


def assert_one_sentence(result: dict, *needles: str) -> str:
    assert result["code"] == 2, result
    assert "Traceback" not in result["output"]
    errors = [x for x in result["output"].splitlines() if x.startswith("error:")]
    assert len(errors) == 1, result["output"]
    text = " ".join(result["output"].split())  # rich wraps long lines
    for needle in needles:
        assert needle in text, text
    return text


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """A tiny Llama in HF, legacy torch and torch_dist form, and each with a 10M-layer config."""
    from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Target
    from mzoo.jobs.convert import convert
    from mzoo.jobs.sources import open_source

    root = tmp_path_factory.mktemp("bounds")
    hf = make_hf_model(root / "hf", LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=32))
    for fmt in ("torch", "torch_dist"):
        convert(open_source(hf), root / fmt, Target(fmt, MegatronCheckpoint()))

    deep = root / "hf-deep"
    shutil.copytree(hf, deep)
    cfg = json.loads((hf / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": HUGE_LAYERS}))
    for fmt in ("torch", "torch_dist"):
        shutil.copytree(root / fmt, root / f"{fmt}-deep")
        side = root / f"{fmt}-deep" / "mzoo.yaml"
        data = yaml.safe_load(side.read_text())
        data["model"]["num_layers"] = HUGE_LAYERS
        side.write_text(yaml.safe_dump(data))

    wide = root / "hf-wide"  # two layers, as the files hold, but a hidden size no machine holds
    shutil.copytree(hf, wide)
    (wide / "config.json").write_text(json.dumps({**cfg, "hidden_size": 2**22, "intermediate_size": 2**24,
                                                  "head_dim": 8}))
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from test_sft import make_tokenizer  # the word-level tokenizer the finetuning tests use

    make_tokenizer(wide)
    (root / "sft.jsonl").write_text(json.dumps({"prompt": "w1 w2", "completion": "w2 w1"}) + "\n")
    preset = yaml.safe_load((Path(__file__).parents[2] / "zoo" / "presets" / "llama-tiny.yaml").read_text())
    (root / "deep.yaml").write_text(yaml.safe_dump({**preset, "name": "deep", "num_layers": HUGE_LAYERS}))
    (root / "wide.yaml").write_text(yaml.safe_dump({**preset, "name": "wide", "hidden_size": 2**20,
                                                    "ffn_hidden_size": 2**22}))
    return root


def test_layer_count_is_checked_against_the_weight_files(ckpts, tmp_path):
    """inspect / convert / verify / generate on a config claiming 10M layers: one sentence with both numbers."""
    deep = ckpts / "hf-deep"
    results = run_capped([
        ["inspect", deep],
        ["convert", "hf->megatron", deep, tmp_path / "out"],
        ["verify", ckpts / "hf", deep],
        ["generate", deep, "--prompt-ids", "1,2", "--max-new-tokens", "1"],
    ])
    for result in results:
        assert_one_sentence(result, "10000000", "2 layers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_mzoo_yaml_layer_count_is_checked_against_megatron_keys(ckpts, fmt, tmp_path):
    deep = ckpts / f"{fmt}-deep"
    results = run_capped([["inspect", deep], ["convert", "megatron->hf", deep, tmp_path / "out"]])
    for result in results:
        assert_one_sentence(result, "10000000", "2 layers")
    assert not (tmp_path / "out").exists()


def test_the_untouched_checkpoints_still_read(ckpts):
    """The check refuses only the lie: the originals (and DeepSeek's MTP extras, tests/converters) pass."""
    results = run_capped([["inspect", ckpts / name] for name in ("hf", "torch", "torch_dist")])
    for result in results:
        assert result["code"] == 0, result
        assert "2 layers" in result["output"]


def test_param_count_is_constant_time_in_layers():
    """count_params on 10M layers answers at once (it walked every layer: ~10 s)."""
    import time

    from mzoo.params import count_params
    from mzoo.zoo import resolve

    cfg = resolve("llama-tiny")
    small, huge = count_params(cfg), None
    start = time.perf_counter()
    huge = count_params(cfg.replace(num_layers=HUGE_LAYERS))
    assert time.perf_counter() - start < 5  # walking every layer took over 10 s; a loaded 2-core machine needs the slack
    per_layer = (count_params(cfg.replace(num_layers=3)).total - small.total)
    assert huge.total == small.total + per_layer * (HUGE_LAYERS - 2)


def test_sizes_no_machine_holds_are_refused_before_anything_is_built(ckpts, tmp_path, monkeypatch):
    """Case 10(b): a consistent layer count but a hidden size of 4M (config.json) or 1M (mzoo.yaml): each
    job that builds a model names the bytes it needs and what the machine offers, in one sentence,
    before it allocates (generate and verify died in a MemoryError, init allocating a 64 TiB tensor);
    a 10M-layer preset reaches train's fit check at once (it built a 10M-layer meta model first)."""
    monkeypatch.setenv("MZOO_FREE_BYTES", str(2**62))  # a disk that holds anything: memory is what refuses
    wide, tiny = ckpts / "hf-wide", ("--seq-len", "16", "--micro-batch", "1", "--global-batch", "1", "--steps", "1")
    results = run_capped([
        ["generate", wide, "--prompt-ids", "1,2", "--max-new-tokens", "1"],
        ["verify", ckpts / "hf", wide],
        ["init", ckpts / "wide.yaml", tmp_path / "init"],
        ["train", ckpts / "wide.yaml", "--mock-data", *tiny, "--save", tmp_path / "train"],
        ["train", ckpts / "deep.yaml", "--mock-data", *tiny, "--save", tmp_path / "deep"],
        ["finetune", wide, "--data", ckpts / "sft.jsonl", "--format", "prompt-completion", *tiny,
         "--save", tmp_path / "ft"],
    ])
    texts = [assert_one_sentence(r, "needs about", "this machine offers") for r in results]
    assert "generating from" in texts[0] and "PiB of memory" in texts[0]
    assert "parameters in fp32" in texts[1]
    assert "initialising decoder.layers.0.mlp.linear_fc1.weight of shape 8388608x1048576 needs about 64.0 TiB" \
        in texts[2]
    assert all("(--force starts anyway)." in t for t in texts[3:])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plan_of_ten_million_layers_answers(ckpts):
    """`mzoo plan` on deep.yaml: every layout's memory from per-kind counts (the per-layer walk and
    millions of vpp candidates ran past the alarm); `train --dry-run`, which lists the rank's tensors
    from a meta model (about 4 KiB of Python objects each), says what that listing would need."""
    result, dry = run_capped([["plan", ckpts / "deep.yaml", "--gpus", "8", "--json"],
                              ["train", ckpts / "deep.yaml", "--mock-data", "--dry-run"]])
    assert_one_sentence(dry, "listing rank 0's 60,000,003 parameter tensors (10,000,000 layers) on the meta "
                        "device needs about", "this machine offers")
    assert result["code"] == 0, result
    plans = json.loads(result["output"])
    assert plans and not any(p["feasible"] for p in plans)  # terabytes per GPU, as the counts say
    assert min(p["memory_gb"] for p in plans) > 1000
