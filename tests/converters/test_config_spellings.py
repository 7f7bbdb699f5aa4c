"""config.json that mzoo writes speaks transformers 4.5x and 5 at once: the rope in 5's
`rope_parameters` and in 4's top-level `rope_theta` + `rope_scaling`, the dtype as `dtype` and
`torch_dtype`, NemotronH's layer list and `hybrid_override_pattern`. transformers 5 must read the file
exactly as it reads the 5 spelling alone (no warning), and mzoo must read either spelling back.

That transformers 4.5x then computes the same logits needs a second environment: benchmarks/tf4.py
measures it, docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import pytest
import torch
import transformers
from transformers import AutoConfig

from mzoo.config import ModelConfig, RopeConfig
from mzoo.converters import for_hf_config
from mzoo.converters.hf import save_hf
from mzoo.models.canonical import random_canonical
from mzoo.zoo import get

ROPE4 = ("rope_theta", "rope_scaling", "partial_rotary_factor")  # transformers 4's rope keys
NEMOTRON4 = ("hybrid_override_pattern", "num_hidden_layers")  # NemotronH before transformers 5


def _llama(rope: RopeConfig) -> ModelConfig:
    return replace(get("llama-tiny").config, rope=rope)


CASES = {
    "llama3": lambda: _llama(RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=32)),
    "linear-partial": lambda: _llama(RopeConfig(theta=20000.0, scaling="linear", factor=2.0,
                                                rotary_percent=0.5)),
    "deepseek-yarn": lambda: get("deepseek-tiny").config,
    "mixtral-plain": lambda: get("mixtral-tiny").config,
    "gpt-no-rope": lambda: get("gpt-tiny").config,
    "nemotron_h": lambda: get("mamba-hybrid-tiny").config,
    "qwen2": lambda: get("qwen2-tiny").config,
    "qwen3-moe": lambda: get("qwen3-moe-tiny").config,  # num_local_experts (5) and num_experts (4.x)
}


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Every warning transformers logs or raises inside the block (tests run it at error verbosity)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logs = transformers.utils.logging
    root, level, keep = logs.get_logger(), logs.get_verbosity(), Keep()
    root.addHandler(keep)
    logs.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        logs.set_verbosity(level)
        root.removeHandler(keep)


def _read5(tmp_path, name: str, config: dict) -> dict:
    """What transformers 5 makes of a config.json (its own bookkeeping keys left out)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    out = AutoConfig.from_pretrained(folder).to_dict()
    return {k: v for k, v in out.items() if k not in ("_name_or_path", "transformers_version")}


@pytest.mark.parametrize("case", CASES)
def test_config_json_carries_both_spellings_and_transformers_5_reads_it_unchanged(tmp_path, case):
    cfg = CASES[case]()
    out = save_hf(cfg, random_canonical(cfg, seed=1), tmp_path / "out", dtype=torch.bfloat16)
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"

    params = written.get("rope_parameters")
    if params is None:  # no rope: no 4.x rope keys either
        assert not set(ROPE4) & set(written)
    else:  # the 4.x spelling says the same rope
        assert written["rope_theta"] == params["rope_theta"] == cfg.rope.theta
        assert written.get("partial_rotary_factor", 1.0) == params.get("partial_rotary_factor", 1.0)
        scaling = {k: v for k, v in params.items() if k not in ROPE4}
        assert written["rope_scaling"] == (scaling if params["rope_type"] != "default" else None)
    if written["model_type"] == "nemotron_h":
        pattern = cfg.ssm.hybrid_pattern
        assert written["hybrid_override_pattern"] == pattern and written["num_hidden_layers"] == len(pattern)

    legacy = {*ROPE4, "torch_dtype", *(NEMOTRON4 if written["model_type"] == "nemotron_h" else ())}
    only5 = {k: v for k, v in written.items() if k not in legacy}
    with transformers_warnings() as seen:
        both = _read5(tmp_path, "both", written)
    assert seen == []
    assert both == _read5(tmp_path, "only5", only5)  # rope, dtype, layers: all as before

    adapter = for_hf_config(written)
    assert adapter.config_from_hf(written).to_dict() == adapter.config_from_hf(only5).to_dict()
    if params is not None:  # a transformers 4 config.json (no rope_parameters) reads to the same rope
        only4 = {k: v for k, v in written.items() if k != "rope_parameters"}
        assert adapter.config_from_hf(only4).rope == adapter.config_from_hf(written).rope == cfg.rope
