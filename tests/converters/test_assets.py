"""The tokenizer, chat template, generation config and special ids travel with the weights through
every format: hf -> megatron (each format) -> reshard -> hf keeps them byte for byte; Megatron
checkpoints hold them in iter_XXXXXXX/tokenizer/ (Megatron-Bridge's place) with args naming it;
`--tokenizer DIR` supplies one to a checkpoint that has none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from mzoo.ckpt.dist import DistReader
from mzoo.ckpt.hf import CheckpointError
from mzoo.jobs.convert import ConvertRequest, run
from mzoo.layout import Layout

CONFIG = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
GENERATION = dict(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0, do_sample=True, temperature=0.7, top_p=0.9)
CARRIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<s>", "</s>", "<eot>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from conftest import make_hf_model

    path = make_hf_model(tmp_path_factory.mktemp("src") / "llama", CONFIG)
    _tokenizer(path)
    GenerationConfig(**GENERATION).save_pretrained(str(path))
    return path


def _convert(src: Path, dst: Path, to: str, **kw) -> None:
    run(ConvertRequest(src=src, dst=dst, to=to, **kw))


def _args(root: Path, fmt: str):
    folder = root / "release"
    if fmt == "torch":
        return torch.load(folder / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    if fmt == "torch_dist":
        return DistReader(folder, trust_pickle=True).common["args"]
    from mzoo.ckpt import zarr as zarr_fmt

    return zarr_fmt.ZarrCheckpoint(folder).common["args"]


def _same_assets(got: Path, want: Path) -> None:
    for name in CARRIED:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    config, source = (json.loads((p / "config.json").read_text()) for p in (got, want))
    assert {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} == {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    messages = [{"role": "user", "content": "the fox"}]
    a, b = (AutoTokenizer.from_pretrained(str(p)) for p in (got, want))
    assert a.apply_chat_template(messages, tokenize=False) == b.apply_chat_template(messages, tokenize=False)
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist", "zarr"])
def test_round_trip_through_every_megatron_format_keeps_the_tokenizer(source, tmp_path, fmt):
    mid, resharded, back = tmp_path / "mid", tmp_path / "resharded", tmp_path / "back"
    _convert(source, mid, "megatron", expect="hf", megatron_format=fmt, layout=Layout(tp=2))
    folder = mid / "release" / "tokenizer"
    for name in CARRIED:
        assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    args = _args(mid, fmt)
    assert args.tokenizer_type == "HuggingFaceTokenizer" and Path(args.tokenizer_model) == folder.absolute()
    _convert(mid, resharded, "megatron", expect="megatron", megatron_format="torch_dist", layout=Layout(tp=1))
    _convert(resharded, back, "hf", expect="megatron")
    _same_assets(back, source)


def test_tokenizer_flag_supplies_one_to_a_checkpoint_without(source, tmp_path):
    bare_hf = tmp_path / "bare-hf"
    bare_hf.mkdir()
    for f in source.iterdir():
        if f.name not in (*CARRIED, "special_tokens_map.json"):
            (bare_hf / f.name).write_bytes(f.read_bytes())
    bare = tmp_path / "bare"
    _convert(bare_hf, bare, "megatron", expect="hf")
    assert not (bare / "release" / "tokenizer").exists()
    assert _args(bare, "torch_dist").tokenizer_type == "NullTokenizer"
    with pytest.raises(CheckpointError, match="holds no tokenizer.json"):
        _convert(bare, tmp_path / "never", "hf", expect="megatron", tokenizer=tmp_path)
    assert not (tmp_path / "never").exists()
    out = tmp_path / "out"
    _convert(bare, out, "hf", expect="megatron", tokenizer=source)
    _same_assets(out, source)


def test_a_tokenizer_file_linked_out_of_its_folder_is_refused(source, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    linked = tmp_path / "linked-tokenizer"
    linked.mkdir()
    (linked / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    (linked / "tokenizer.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="points outside"):
        _convert(source, tmp_path / "never", "megatron", expect="hf", tokenizer=linked)
    assert not (tmp_path / "never").exists()
