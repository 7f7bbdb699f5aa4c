"""Megatron-LM's legacy "torch" format: one pickle per rank, local layer numbering.

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt   {'args', 'checkpoint_version',
                                                             'iteration', 'model' | 'model0'..}

Rank files are written incrementally (one tensor at a time) and read memory-mapped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.megatron import (
    MegatronLayout,
    args_to_layout,
    extra_state_name,
    find_iteration_dir,
    to_spelling,
)
from mzoo.ckpt.safe_pickle import torch_load
from mzoo.ckpt.torch_zip import IncrementalTorchWriter
from mzoo.parallel.pipeline import layer_owner, stage_layers
from mzoo.parallel.sharding import ShardSpec, shard_padded

FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def model_key(vp_stage: int, vpp: int) -> str:
    return "model" if vpp == 1 else f"model{vp_stage}"


def split_layer_name(name: str) -> tuple[Optional[int], str]:
    """'decoder.layers.7.mlp.x' -> (7, 'mlp.x'); other names -> (None, name)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def placement(name: str, ranges: list[list[range]]) -> tuple[int, int, str]:
    """(pp_rank, vp_stage, local name) of a canonical tensor."""
    layer, rest = split_layer_name(name)
    if layer is not None:
        p, v, local = layer_owner(ranges, layer)
        return p, v, f"decoder.layers.{local}.{rest}"
    if name.startswith("embedding."):
        return 0, 0, name
    return len(ranges) - 1, len(ranges[-1]) - 1, name  # final norm, output layer


class LegacyReader:
    """Reads canonical tensors from legacy rank files (memory-mapped), merging TP shards."""

    def __init__(self, path: str | Path, trust_pickle: bool = False):
        self.root = Path(path)
        self.folder, self.iteration = find_iteration_dir(self.root)
        self.trust_pickle = trust_pickle
        ranks = {}
        for d in sorted(self.folder.iterdir()):
            m = _RANK_DIR.match(d.name)
            if m and d.is_dir():
                if not (d / FILE).exists():
                    raise CheckpointError(f"{d} has no {FILE}; the checkpoint is incomplete.")
                ranks[(int(m.group(1)), int(m.group(2) or 0))] = d / FILE
        if not ranks:
            raise CheckpointError(f"{self.folder} holds no mp_rank_* folders; it is not a legacy Megatron checkpoint.")
        self.files = ranks
        self._cache: dict[tuple[int, int], dict[str, Any]] = {}
        first = self._load(min(ranks))
        if "args" not in first:
            raise CheckpointError(f"{self.files[min(ranks)]} has no 'args'; mzoo cannot tell the layout.")
        self.args = first["args"]
        model_state = first.get("model", first.get("model0", {}))
        spec = "te" if any(k.endswith("layer_norm_weight") for k in model_state) else "local"
        self.layout: MegatronLayout = args_to_layout(self.args, spec)
        self.layout.iteration = self.iteration
        expected = {(t, p) for t in range(self.layout.tp) for p in range(self.layout.pp)}
        missing = sorted(expected - set(ranks))
        if missing:
            t, p = missing[0]
            raise CheckpointError(
                f"{self.folder} is missing {rank_dir(t, p, self.layout.pp)} (args say tp={self.layout.tp}, "
                f"pp={self.layout.pp}); the copy is incomplete."
            )
        self.specs: dict[str, ShardSpec] = {}
        self.ranges: list[list[range]] = []
        self.dtype = next((v.dtype for v in model_state.values() if isinstance(v, torch.Tensor)), torch.float32)

    def _load(self, key: tuple[int, int]) -> dict[str, Any]:
        if key not in self._cache:
            # Canonical order walks the stages in turn: drop other stages' mappings so the pages
            # they touched leave this process.
            for other in [k for k in self._cache if k[1] != key[1]]:
                del self._cache[other]
            self._cache[key] = torch_load(self.files[key], self.trust_pickle, mmap=True)
        return self._cache[key]

    def bind(self, num_layers: int, specs: dict[str, ShardSpec]) -> None:
        """Tell the reader the model's layers and ShardSpecs (from a meta model)."""
        lay = self.layout
        self.ranges = stage_layers(num_layers, lay.pp, lay.vpp, lay.first_stage_layers, lay.last_stage_layers)
        self.specs = specs

    def get(self, name: str) -> torch.Tensor:
        p, v, local = placement(name, self.ranges)
        spelled = to_spelling(local, self.layout.spec)
        spec = self.specs.get(name, ShardSpec())
        tp_ranks = range(self.layout.tp) if spec.axis == "tp" else range(1)
        shards = []
        for t in tp_ranks:
            state = self._load((t, p)).get(model_key(v, self.layout.vpp))
            if state is None or spelled not in state:
                raise CheckpointError(
                    f"{self.files[(t, p)]} has no {spelled} in {model_key(v, self.layout.vpp)}; "
                    "the checkpoint does not match its args."
                )
            shards.append(state[spelled])
        return spec.merge(shards)


def write_legacy(
    folder: Path,
    names: Iterable[str],
    fetch: Callable[[str], torch.Tensor],
    specs: dict[str, ShardSpec],
    layout: MegatronLayout,
    num_layers: int,
    args: Any,
    padded_vocab: int,
    tied: bool,
    on_tensor: Callable[[int], None] = lambda n: None,
) -> list[Path]:
    """Write every rank file of `layout` into the iteration folder `folder`, stage by stage;
    each canonical tensor is fetched once and sharded into all TP ranks' files."""
    ranges = stage_layers(num_layers, layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers)
    by_stage: dict[int, list[tuple[int, str, str]]] = {p: [] for p in range(layout.pp)}
    for name in names:
        p, v, local = placement(name, ranges)
        by_stage[p].append((v, name, local))
        if tied and layout.pp > 1 and name == "embedding.word_embeddings.weight":
            # Megatron keeps a copy of the tied embedding as output_layer on the last stage.
            by_stage[layout.pp - 1].append((layout.vpp - 1, name, "output_layer.weight"))
    written = []
    for p in range(layout.pp):
        writers, states = [], []
        for t in range(layout.tp):
            d = folder / rank_dir(t, p, layout.pp)
            d.mkdir(parents=True)
            writers.append(IncrementalTorchWriter(d / FILE))
            states.append({model_key(v, layout.vpp): {} for v in range(layout.vpp)})
        for v, name, local in by_stage[p]:
            full = fetch(name)
            spec = specs.get(name, ShardSpec())
            spelled = to_spelling(local, layout.spec)
            for t in range(layout.tp):
                size, rank = (layout.tp, t) if spec.axis == "tp" else (1, 0)
                piece = shard_padded(full, spec, rank, size, padded_vocab)
                states[t][model_key(v, layout.vpp)][spelled] = writers[t].tensor(piece)
                extra = extra_state_name(spelled)
                if extra:
                    states[t][model_key(v, layout.vpp)][extra] = None
            on_tensor(full.numel() * full.element_size())
            del full
        if p == layout.pp - 1:  # megatron's output layer has extra state even when its weight is tied
            for t in range(layout.tp):
                states[t][model_key(layout.vpp - 1, layout.vpp)].setdefault("output_layer._extra_state", None)
        for t in range(layout.tp):
            top = {"args": args, "checkpoint_version": 3.0, "iteration": layout.iteration if isinstance(layout.iteration, int) else 0,
                   **states[t]}
            writers[t].finish(top)
            written.append(writers[t].path)
    return written

