"""Shared fixtures: tiny Hugging Face models made by transformers itself, and gloo process groups."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(1)


def make_hf_model(path: Path, config, seed: int = 0) -> Path:
    """Random-init a transformers model from `config`, perturb norms/biases so that every tensor
    matters (tests/informative.py), and save_pretrained it to `path`."""
    from transformers import AutoModelForCausalLM

    from informative import perturb_hf_

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_hf_(model)  # norms start at 1 and biases at 0: make them informative
    model.save_pretrained(path)
    return path


def make_moe_model(path: Path, config, seed: int = 0) -> Path:
    """A transformers MoE model whose routers make clear choices (no near-ties between experts)
    and whose every norm, bias and expert-score correction is informative."""
    from transformers import AutoModelForCausalLM

    from informative import perturb_hf_

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_hf_(model, moe=True)
    model.save_pretrained(path)
    return path


def all_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_roundtrip(src: Path, dst: Path):
    """HF -> canonical -> HF through converters.hf, one canonical tensor at a time; the config."""
    from mzoo.models.canonical import canonical_tensors
    from mzoo.converters.hf import read_config, save_hf

    reader, adapter, cfg = read_config(src)
    save_hf(cfg, ((t.name, adapter.to_canonical(t.name, reader.get, cfg)) for t in canonical_tensors(cfg)), dst)
    return cfg


@pytest.fixture
def hf_factory(tmp_path):
    counter = {"n": 0}

    def factory(config, seed: int = 0) -> Path:
        counter["n"] += 1
        return make_hf_model(tmp_path / f"hf{counter['n']}", config, seed)

    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
