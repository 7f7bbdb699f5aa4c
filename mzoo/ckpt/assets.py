"""What travels with the weights: tokenizer files, chat template, generation config and special ids.

A converted instruct model must still stop generating, and downstream tools (llama.cpp's converter,
vLLM) refuse a folder without its tokenizer, so every format carries them:
- Hugging Face: the files beside config.json; bos/eos/pad ids in config.json.
- Megatron (legacy, torch_dist, zarr): the files in `iter_XXXXXXX/tokenizer/`, where Megatron-Bridge
  saves a checkpoint's tokenizer and where its `load_tokenizer` looks; the ids in mzoo.yaml.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mzoo.ckpt.hf import TOKENIZER_FILES, CheckpointError

TOKENIZER_DIR = "tokenizer"  # inside a Megatron iteration folder (Megatron-Bridge's place)
GENERATION = "generation_config.json"
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a folder holds a tokenizer when it has one


@dataclass(frozen=True)
class Assets:
    """Files to copy beside the weights, and the special token ids the model config states."""

    files: tuple[Path, ...] = ()
    special: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids; an id may be a list (eos)

    @property
    def has_tokenizer(self) -> bool:
        return any(f.name in MARKERS for f in self.files)

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        return next((f.parent for f in self.files if f.name in MARKERS), None)

    @property
    def tokenizer_files(self) -> list[Path]:
        return [f for f in self.files if f.name != GENERATION]

    @property
    def generation(self) -> Optional[Path]:
        return next((f for f in self.files if f.name == GENERATION), None)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def copy_into(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            shutil.copy2(f, folder / f.name)

    def with_tokenizer(self, other: "Assets") -> "Assets":
        """`--tokenizer DIR`: its files replace these of the same name; its ids fill the ones unknown."""
        names = {f.name for f in other.files}
        files = tuple(f for f in self.files if f.name not in names) + other.files
        special = {**other.special, **{k: v for k, v in self.special.items() if v is not None}}
        return Assets(files, special)


def folder_assets(folder: Path, config: Optional[dict] = None) -> Assets:
    """The assets in one folder (an HF checkpoint, a tokenizer folder, a Megatron `tokenizer/`); the
    special ids from `config` (config.json), else generation_config.json, else the tokenizer's own."""
    folder = Path(folder)
    files = tuple(_inside(folder, f) for f in (*TOKENIZER_FILES, GENERATION) if (folder / f).is_file())
    special = _ids(config or {})
    if not special and (folder / GENERATION).is_file():
        special = _ids(_json(folder / GENERATION))
    if not special:
        special = tokenizer_ids(folder) if any(f.name in MARKERS for f in files) else {}
    return Assets(files, special)


def tokenizer_assets(folder: Path) -> Assets:
    """`--tokenizer DIR`: a folder saved with save_pretrained(); one sentence when it is not."""
    found = folder_assets(folder) if Path(folder).is_dir() else Assets()
    if not found.has_tokenizer:
        raise CheckpointError(f"{folder} holds no tokenizer.json, tokenizer.model or vocab.json; pass a folder saved "
                              "with tokenizer.save_pretrained().")
    return found


def megatron_assets(iteration_folder: Path, sidecar: Optional[dict]) -> Assets:
    """A Megatron checkpoint's assets: `tokenizer/` in its iteration folder (mzoo's and Bridge's), the
    ids mzoo.yaml records."""
    folder = Path(iteration_folder) / TOKENIZER_DIR
    recorded = _ids((sidecar or {}).get("special_tokens") or {})
    return folder_assets(folder, recorded or None) if folder.is_dir() else Assets((), recorded)


def write_special(config: dict, assets: Assets) -> dict:
    """config.json with the source's special ids (adapters write None: they know no tokenizer)."""
    return {**config, **{k: v for k, v in assets.special.items() if k in SPECIAL_IDS}}


def generation_config(assets: Assets) -> dict:
    """generation_config.json: the source's own, else the ids from its config (transformers' default)."""
    if assets.generation is not None:
        return _json(assets.generation)
    return {"_from_model_config": True, **{k: v for k, v in assets.special.items() if v is not None}}


def tokenizer_ids(folder: Path) -> dict[str, Any]:
    """bos/eos/pad ids a tokenizer folder names (Bridge checkpoints carry no config.json): the tokens
    tokenizer_config.json (or special_tokens_map.json) names, looked up in tokenizer.json; read as
    JSON, without loading the tokenizer, so a broken one is reported by whoever uses it."""
    folder = Path(folder)
    try:
        named = {**_json_or_empty(folder / "special_tokens_map.json"), **_json_or_empty(folder / "tokenizer_config.json")}
        vocab = _json_or_empty(folder / "tokenizer.json")
    except ValueError:
        return {}
    ids = vocabulary(vocab)
    out = {}
    for key in SPECIAL_IDS:
        token = named.get(key.replace("_id", ""))
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and isinstance(ids.get(token), int):
            out[key] = ids[token]
    return out


def vocabulary(tokenizer_json: dict) -> dict[str, int]:
    """token -> id of a parsed tokenizer.json: the model's vocabulary (a dict, or Unigram's list of
    [piece, score]) and the added tokens."""
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {str(p[0]): i for i, p in enumerate(vocab) if isinstance(p, list) and p}
    ids.update({t.get("content"): t.get("id") for t in tokenizer_json.get("added_tokens") or [] if isinstance(t, dict)})
    return {k: v for k, v in ids.items() if isinstance(v, int)}


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused when a symlink takes it out of the folder (as HF shards are)."""
    from mzoo.ckpt.paths import inside

    return inside(folder, folder / name)


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _ids(config: dict) -> dict[str, Any]:
    return {k: config[k] for k in SPECIAL_IDS if config.get(k) is not None}


def _json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path} is not readable JSON; the checkpoint is damaged.") from None
    return data if isinstance(data, dict) else {}
