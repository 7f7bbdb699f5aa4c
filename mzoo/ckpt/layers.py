"""How many layers a checkpoint's weight files hold, read off tensor names and headers only.

A config's layer count sizes everything built from it (canonical tensor lists, meta models, whole
models), so a config.json or mzoo.yaml that claims 10M layers would take minutes or all memory
before any read fails. Readers compare the claim with these counts first: one sentence naming both."""

from __future__ import annotations

import re
from typing import Callable, Iterable

from mzoo.ckpt.hf import CheckpointError

# `model.layers.3.`, `transformer.h.3.` (GPT-2), `backbone.layers.3.` (Mamba), `decoder.layers.3.` (Megatron)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
_STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)")  # torch_dist keys whose dim 0 is the layer


def layer_indices(names: Iterable[str]) -> set[int]:
    """The layer numbers that occur in tensor names (the first `layers.N.` / `h.N.` of each)."""
    out = set()
    for name in names:
        m = _LAYER.search(name)
        if m:
            out.add(int(m.group(1)))
    return out


def held_layers(names: Iterable[str]) -> int:
    """Layers numbered 0..n-1 in the names: the highest index + 1 (0 when none is numbered)."""
    found = layer_indices(names)
    return max(found) + 1 if found else 0


def dist_layers(keys: Iterable[str], shape: Callable[[str], tuple[int, ...]]) -> int:
    """Layers of a torch_dist / zarr checkpoint: per-layer keys by number, stacked keys by dim 0."""
    keys = list(keys)
    stacked = [shape(k)[0] for k in keys if _STACKED.match(k) and shape(k)]
    return max([held_layers(k for k in keys if k.startswith("decoder.")), *stacked])


def check_layer_count(claimed: int, held: int, config: str, files: str, extra: int = 0,
                      key: str = "num_layers") -> None:
    """Refuse a config whose layer count is not what the files hold (`extra` layers beyond it, such as
    DeepSeek's MTP layers, may be present and are not part of the model)."""
    if held == 0 or claimed <= held <= claimed + extra:
        return
    raise CheckpointError(f"{config} says {key} is {claimed} but {files} hold {held} layers; the config does not "
                          f"match the weights, so set {key} to {held}.")
