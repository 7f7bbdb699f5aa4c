"""Supervised finetuning: the loss mask covers exactly the completion / assistant tokens, packing
keeps examples apart (a packed example's logits equal its logits alone), finetuning a tiny model on
a synthetic task drives the validation loss down, TP2 and CP2 equal one process, and bad data lines are
one sentence naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import dist as D
import pytest
import torch
from conftest import make_hf_model
from typer.testing import CliRunner

from mzoo.cli.main import app
from mzoo.config import ModelConfig
from mzoo.data import sft
from mzoo.layout import Layout
from mzoo.models import build_model
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer

WORDS = [f"w{i}" for i in range(60)]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def make_tokenizer(folder: Path):
    """A word-level tokenizer with role markers, an end token and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_mask_covers_exactly_the_completion(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    ex = sft.tokenize({"prompt": "w1 w2 w3", "completion": "w4 w5"}, "prompt-completion", tok)
    words = tok.convert_ids_to_tokens(ex.tokens)
    assert words == ["w1", "w2", "w3", "w4", "w5", "</s>"]
    assert ex.trained == [False, False, False, True, True, True]
    [sample] = sft.pack([ex], seq_len=8)
    # a label is trained iff it is a completion token: labels w4, w5, </s>
    trained_labels = [tok.convert_ids_to_tokens(int(t)) for t, m in zip(sample.labels, sample.loss_mask) if m]
    assert trained_labels == ["w4", "w5", "</s>"]


def test_chat_mask_covers_exactly_the_assistant_turns(tmp_path):
    tok = make_tokenizer(tmp_path / "tok")
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w1 w2"},
                {"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"},
                {"role": "assistant", "content": "w5 w6"}]
    ex = sft.tokenize({"messages": messages}, "chat", tok)
    words = tok.convert_ids_to_tokens(ex.tokens)
    trained = [w for w, t in zip(words, ex.trained) if t]
    assert trained == ["w3", "</s>", "w5", "w6", "</s>"]  # the answers and their end tokens, not the role markers
    assert words.count("<assistant>") == 2


def test_packing_keeps_examples_apart(tmp_path):
    """Example B packed after A gets exactly the logits B gets alone: positions restart and no token
    attends across the boundary."""
    cfg = ModelConfig(family="llama", vocab_size=80, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64)
    model = build_model(cfg).eval()
    model.init_weights(seed=1)
    a = sft.Example([5, 6, 7, 8, 9], [True] * 5)
    b = sft.Example([10, 11, 12, 13], [True] * 4)
    [packed] = sft.pack([a, b], seq_len=12)
    assert packed.segments.tolist()[:9] == [0] * 5 + [1] * 4
    assert packed.loss_mask[4] == 0  # the last token of A does not learn to predict B's first
    with torch.no_grad():
        together = model(packed.tokens[None], position_ids=packed.position_ids[None], segments=packed.segments[None])
        alone = model(torch.tensor([b.tokens]))
    assert (together[0, 5:9] - alone[0]).abs().max() < 1e-5
    assert sft.pack([a, b], seq_len=12, packing=False)[1].tokens[:4].tolist() == b.tokens


def _task(n: int, seed: int) -> list[dict]:
    """Completion = the prompt's words reversed: learnable, and the prompt alone is not trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, 20, (4,), generator=g)]
        out.append({"prompt": " ".join(words), "completion": " ".join(reversed(words))})
    return out


def _finetune(state: ParallelState, folder: str, steps: int = 30) -> tuple[list[float], list[float]]:
    from transformers import AutoTokenizer

    from mzoo.converters.hf import load_hf_model

    tok = AutoTokenizer.from_pretrained(folder)
    _, model = load_hf_model(Path(folder) / "model", state)
    train, valid, _ = sft.build(sft.SFTConfig(Path(folder) / "train.jsonl", "prompt-completion",
                                              valid_data=Path(folder) / "valid.jsonl"), tok, 32, 128, 0)
    tcfg = TrainConfig(seq_len=32, micro_batch=2, global_batch=8, steps=steps, lr=3e-3, min_lr=3e-4, warmup=2,
                       weight_decay=0.0, eval_interval=steps // 3, eval_iters=1)
    trainer = Trainer(model, model.cfg, state, tcfg, sft.sampler(train, 0), sft.sampler(valid, 0))
    val = [trainer.evaluate(trainer.valid_sampler, 1)]
    logs = trainer.train()
    return [log.loss for log in logs], val + [log.val_loss for log in logs if log.val_loss is not None]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("sft")
    make_tokenizer(folder)
    make_hf_model(folder / "model", LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=64))
    write_jsonl(folder / "train.jsonl", _task(64, 0))
    write_jsonl(folder / "valid.jsonl", _task(16, 1))
    return folder


@pytest.fixture(scope="module")
def reference(task_folder):
    torch.set_num_threads(1)
    return _finetune(ParallelState.single(), str(task_folder))


def test_finetuning_drives_validation_loss_down(reference):
    _, val = reference
    print("validation loss by evaluation:", [round(v, 4) for v in val])
    assert val[-1] < 0.7 * val[0], val


def _layout_worker(rank, world, folder, layout):
    return _finetune(ParallelState.build(Layout(**layout)), folder)


@pytest.mark.dist
@pytest.mark.parametrize("layout, world", [(dict(tp=2), 2), (dict(cp=2), 2)], ids=["tp2", "cp2"])
def test_layout_matches_single_process(reference, task_folder, layout, world):
    """CP2: packed examples cross the chunk boundaries, so each rank's queries need the segment ids
    of keys held by the other rank, and the loss mask's token count is the whole micro-batch's."""
    for losses, val in D.run(_layout_worker, world, str(task_folder), layout):
        assert max(abs(a - b) for a, b in zip(losses, reference[0])) <= 1e-5
        assert max(abs(a - b) for a, b in zip(val, reference[1])) <= 1e-5


def test_cli_finetunes_and_saves_a_from_pretrained_folder(task_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "start"
    import shutil

    shutil.copytree(task_folder / "model", model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(task_folder / f, model / f)
    out = tmp_path / "sft"
    result = CliRunner().invoke(app, [
        "finetune", str(model), "--data", str(task_folder / "train.jsonl"), "--format", "prompt-completion",
        "--valid-data", str(task_folder / "valid.jsonl"), "--seq-len", "32", "--steps", "12", "--lr", "3e-3",
        "--eval-interval", "6", "--save", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert len(report["losses"]) == 12 and set(report["val_losses"]) == {"6", "12"}
    AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").exists()


def test_cli_compiled_finetune_trains_as_eager(task_folder):
    """--compile on packed sequences (block-causal masks into the compiled layers) and their
    evaluation (a second graph: no grad, eval mode): eager's losses to tests/train/test_compile.py's
    fp32 bound."""
    args = ["finetune", str(task_folder / "model"), "--data", str(task_folder / "train.jsonl"), "--format",
            "prompt-completion", "--tokenizer", str(task_folder), "--valid-data", str(task_folder / "valid.jsonl"),
            "--seq-len", "32", "--steps", "4", "--lr", "3e-3", "--eval-interval", "4", "--json"]
    reports = []
    for extra in ([], ["--compile"]):
        torch._dynamo.reset()
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.output[result.output.index("{"):]))
    eager, compiled = reports
    assert compiled["layout"]["compile"] and not eager["layout"]["compile"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=0, abs=5e-6)
    assert compiled["val_losses"]["4"] == pytest.approx(eager["val_losses"]["4"], rel=0, abs=5e-6)


@pytest.mark.parametrize("lines, fmt, message", [
    (['{"prompt": "w1", "completion": "w2"}', "{not json"], "prompt-completion", "data.jsonl:2 is not valid JSON"),
    (['{"prompt": "w1"}'], "prompt-completion", "data.jsonl:1 lacks the key 'completion'"),
    (['{"messages": [{"role": "user", "content": "w1"}]}'], "chat", "data.jsonl:1 has no assistant message"),
    (['{"text": 5}'], "text", "data.jsonl:1: 'text' must be a string"),
    (['{"text": "w1"}'], "sql", "unknown --format 'sql'"),
])
def test_bad_data_is_one_sentence_with_file_and_line(task_folder, tmp_path, lines, fmt, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["finetune", str(task_folder / "model"), "--data", str(data), "--format", fmt,
                                      "--tokenizer", str(task_folder), "--save", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
