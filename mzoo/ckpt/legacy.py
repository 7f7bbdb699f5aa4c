"""Megatron-LM's legacy "torch" format: one pickle per rank, local layer and expert numbering.

    ROOT/latest_checkpointed_iteration.txt
    ROOT/iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   {'args', 'checkpoint_version',
                                                                   'iteration', 'model' | 'model0'..}

One file per (TP, PP, EP) rank: `_PPP` when PP > 1, `_EEE` when EP > 1 (so `mp_rank_TT_NNN` is PP
or EP: the args tell which). Every EP rank's file repeats the non-expert tensors and holds its own
E/EP experts numbered from 0 (global = ep_rank * E/EP + local). Rank files are written
incrementally (one tensor at a time) and read memory-mapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from mzoo.ckpt.hf import CheckpointError
from mzoo.ckpt.integrity import Checksums, verify_torch_archive
from mzoo.ckpt.layers import held_layers
from mzoo.ckpt.megatron.args import args_difference, args_to_checkpoint, check_expert_tp
from mzoo.ckpt.megatron.checkpoint import MegatronCheckpoint, Spelling
from mzoo.ckpt.megatron.names import extra_state_name, grouped_spelling, legacy_shard_spec, to_spelling
from mzoo.ckpt.megatron.tracker import find_iteration_dir
from mzoo.ckpt.safe_pickle import torch_load
from mzoo.ckpt.sink import Budget, TensorExtents, cat_rows
from mzoo.ckpt.torch_zip import IncrementalTorchWriter
from mzoo.parallel.pipeline import layer_owner, stage_layers
from mzoo.parallel.sharding import ShardSpec, expert_index, expert_owner, renumber_expert, shard_padded

FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
Rank = tuple[int, int, int]  # (tp, pp, ep)


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron-LM's get_checkpoint_name: mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep > 1 else "")


def parse_rank_dir(name: str, pp: int, ep: int) -> Optional[Rank]:
    """(tp, pp, ep) ranks of a rank folder name, given the layout's PP and EP sizes (a three-part
    name is ambiguous on its own); None for other names."""
    m = _RANK_DIR.match(name)
    if m is None:
        return None
    tp_rank, *rest = [int(g) for g in m.groups() if g is not None]
    if len(rest) != (pp > 1) + (ep > 1):
        raise CheckpointError(f"rank folder {name} does not fit the layout in the checkpoint's args (pp={pp}, ep={ep}); "
                              "the folder holds rank files of another run.")
    pp_rank = rest.pop(0) if pp > 1 else 0
    ep_rank = rest.pop(0) if ep > 1 else 0
    return tp_rank, pp_rank, ep_rank


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


def expert_placement(local: str, num_experts: int, ep: int) -> tuple[range, str]:
    """(EP ranks whose files hold this tensor, its name there): its owner with the EP-local expert
    number for an expert tensor, every EP rank for the rest."""
    e = expert_index(local)
    if e is None:
        return range(ep), local
    owner, index = expert_owner(e, num_experts, ep)
    return range(owner, owner + 1), renumber_expert(local, index)


def spelled(local: str, spelling: Spelling, grouped: bool) -> str:
    """The name a canonical (stage-local, EP-local) tensor has in a rank file of this spelling."""
    name = to_spelling(local, spelling)
    return grouped_spelling(name) if grouped else name


@dataclass(frozen=True)
class Location:
    """Where one TP shard of a canonical tensor lives."""

    rank: Rank
    model: str
    name: str


class LegacyReader:
    """Reads canonical tensors from legacy rank files (memory-mapped), merging TP shards and
    gathering experts from their EP ranks. `bind` checks every rank file up front."""

    def __init__(self, path: str | Path, trust_pickle: bool = False):
        self.root = Path(path)
        self.folder, self.iteration = find_iteration_dir(self.root)
        self.trust_pickle = trust_pickle
        dirs = sorted(d for d in self.folder.iterdir() if d.is_dir() and _RANK_DIR.match(d.name))
        if not dirs:
            raise CheckpointError(f"{self.folder} holds no mp_rank_* folders; it is not a legacy Megatron checkpoint.")
        for d in dirs:
            if not (d / FILE).exists():
                raise CheckpointError(f"{d} has no {FILE}; the checkpoint is incomplete.")
        self.checksums = Checksums(self.folder)
        first = self._torch_load(dirs[0] / FILE)  # rank (0, 0, 0) sorts first
        if not isinstance(first, dict):
            raise CheckpointError(f"{dirs[0] / FILE} holds a {type(first).__name__}, not a Megatron state dict; "
                                  "the checkpoint is corrupt.")
        if "args" not in first:
            raise CheckpointError(f"{dirs[0] / FILE} has no 'args'; mzoo cannot tell the layout.")
        self.args = first["args"]
        check_expert_tp(self.args)
        model_state = first.get("model", first.get("model0", {}))
        spelling: Spelling = "te" if any(k.endswith("layer_norm_weight") for k in model_state) else "local"
        grouped = any(re.search(r"\.experts\.linear_fc[12]\.weight\d+$", k) for k in model_state)
        self.megatron: MegatronCheckpoint = replace(args_to_checkpoint(self.args, spelling), iteration=self.iteration,
                                                moe_grouped_gemm=grouped)
        lay = self.megatron
        par = lay.layout
        self.files: dict[Rank, Path] = {}
        for d in dirs:
            self.files[parse_rank_dir(d.name, par.pp, par.ep)] = d / FILE
        expected = [(t, p, e) for p in range(par.pp) for e in range(par.ep) for t in range(par.tp)]
        missing = [r for r in expected if r not in self.files]
        if missing:
            t, p, e = missing[0]
            raise CheckpointError(
                f"{self.folder} is missing {rank_dir(t, p, par.pp, e, par.ep)} (args say tp={par.tp}, pp={par.pp}, "
                f"ep={par.ep}); the copy is incomplete."
            )
        self._cache: dict[Rank, dict[str, Any]] = {(0, 0, 0): first}
        self._iteration0 = first.get("iteration")
        self._checked: set[Rank] = set()
        self._stage_shapes: dict[int, tuple[Path, dict[tuple[str, str], tuple[int, ...]]]] = {}
        self._same_save((0, 0, 0), first)
        self.locations: dict[str, list[Location]] = {}
        self.specs: dict[str, ShardSpec] = {}
        self.dtype = next((v.dtype for v in model_state.values() if isinstance(v, torch.Tensor)), torch.float32)

    def _load(self, rank: Rank) -> dict[str, Any]:
        if rank not in self._cache:
            # Canonical order walks the stages in turn: drop other stages' mappings so the pages
            # they touched leave this process.
            for other in [k for k in self._cache if k[1] != rank[1]]:
                del self._cache[other]
            self._cache[rank] = self._torch_load(self.files[rank])
            self._same_save(rank, self._cache[rank])
        return self._cache[rank]

    def _same_save(self, rank: Rank, state: Any) -> None:
        """Refuse a rank file of another model or save (once per file, from what is already read):
        its model-defining args and iteration must be rank (0, 0, 0)'s, and every tensor it shares
        with the stage's first file the same shape (TP shards and EP ranks' copies are equal-sized)."""
        if rank in self._checked:
            return
        path, first = self.files[rank], self.files[(0, 0, 0)]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a Megatron state dict; "
                                  "the checkpoint is corrupt.")
        if rank != (0, 0, 0):
            diff = args_difference(state.get("args"), self.args)
            if diff is not None:
                key, mine, theirs = diff
                raise CheckpointError(f"{path} comes from another model than {first}: its args say {key}={mine!r}, "
                                      f"{first.parent.name}'s {theirs!r}; put the checkpoint's own rank files back.")
            if state.get("iteration") != self._iteration0:
                raise CheckpointError(f"{path} was saved at iteration {state.get('iteration')!r} but {first} at "
                                      f"{self._iteration0!r}: the rank files come from different saves; re-copy the "
                                      "iteration folder.")
        shapes = {(chunk, name): tuple(t.shape) for chunk, tensors in state.items()
                  if chunk.startswith("model") and isinstance(tensors, dict)
                  for name, t in tensors.items() if isinstance(t, torch.Tensor)}
        ref_path, ref = self._stage_shapes.setdefault(rank[1], (path, shapes))
        for key, shape in shapes.items():
            if key in ref and ref[key] != shape:
                raise CheckpointError(f"{path} holds {key[1]} with shape {shape} but {ref_path} holds it with "
                                      f"{ref[key]}: the rank files come from differently sized models; put the "
                                      "checkpoint's own rank files back.")
        self._checked.add(rank)

    def _torch_load(self, path: Path) -> Any:
        """A rank file, checked first against mzoo.yaml's CRC-32, else its archive's own."""
        if not self.checksums.verify(path):
            verify_torch_archive(path)
        return torch_load(path, self.trust_pickle, mmap=True)

    def _names(self) -> dict[Rank, dict[str, set[str]]]:
        """Every rank file's tensor names per model chunk (each file mapped once, then released)."""
        out = {}
        for rank in sorted(self.files, key=lambda r: (r[1], r[2], r[0])):
            state = self._load(rank)
            out[rank] = {k: set(v) for k, v in state.items() if k.startswith("model") and isinstance(v, dict)}
        return out

    def layer_count(self) -> int:
        """Layers the rank files hold: each stage's local layer numbers (0.. per model chunk), summed
        over the pipeline stages and virtual chunks of TP rank 0, EP rank 0."""
        names = self._names()
        return sum(held_layers(keys) for (t, _, e), chunks in names.items() if t == 0 and e == 0
                   for keys in chunks.values())

    def bind(self, num_layers: int, specs: dict[str, ShardSpec], num_experts: int = 0) -> None:
        """Tell the reader the model's layers, experts and ShardSpecs (from a meta model); finds
        every tensor's shards and fails on the first one missing, before anything is read."""
        lay = self.megatron
        par = lay.layout
        ranges = stage_layers(num_layers, par.pp, par.vpp, par.first_stage_layers, par.last_stage_layers)
        if par.ep > 1 and (not num_experts or num_experts % par.ep):
            raise CheckpointError(f"the checkpoint's args say ep={par.ep} but the model has {num_experts} experts; "
                                  "its args do not match its config.")
        names = self._names()
        other: Spelling = "local" if lay.spelling == "te" else "te"
        for name, spec in specs.items():
            p, v, local = placement(name, ranges)
            ep_ranks, local = expert_placement(local, num_experts, par.ep)
            e = ep_ranks[0]
            mk = model_key(v, par.vpp)
            candidates = [spelled(local, s, g) for s in (lay.spelling, other) for g in (lay.moe_grouped_gemm, not lay.moe_grouped_gemm)]
            found = next((c for c in candidates if c in names[(0, p, e)].get(mk, ())), None)
            if found is None:
                raise CheckpointError(
                    f"{self.files[(0, p, e)]} has no {candidates[0]} in {mk}; the checkpoint does not match its args."
                )
            spec = legacy_shard_spec(found, spec, lay.spelling)  # the spec detected from the files' norm names
            tp_ranks = range(par.tp) if spec.axis == "tp" else range(1)
            for t in tp_ranks:
                if found not in names[(t, p, e)].get(mk, ()):
                    raise CheckpointError(f"{self.files[(t, p, e)]} has no {found} in {mk}; the copy is incomplete.")
            self.locations[name] = [Location((t, p, e), mk, found) for t in tp_ranks]
            self.specs[name] = spec

    def get(self, name: str) -> torch.Tensor:
        shards = [self._load(loc.rank)[loc.model][loc.name] for loc in self.locations[name]]
        return self.specs[name].merge(shards)


def write_legacy(
    folder: Path,
    names: Iterable[str],
    fetch: Callable[[str], torch.Tensor],
    specs: dict[str, ShardSpec],
    layout: MegatronCheckpoint,
    num_layers: int,
    args: Any,
    padded_vocab: int,
    tied: bool,
    on_tensor: Callable[[int], None] = lambda n: None,
    num_experts: int = 0,
    extents: Optional[Callable[[str], Optional[TensorExtents]]] = None,
) -> list[Path]:
    """Write every rank file of `layout` into the iteration folder `folder`, stage by stage;
    each canonical tensor is fetched once and sharded into all TP (and, unless it is an expert,
    all EP) ranks' files. `extents`: where a canonical tensor's bytes already are; shards that are
    whole rows of it are copied by the kernel."""
    plan = legacy_plan(names, specs, layout, num_layers, tied, num_experts)
    opened: list[IncrementalTorchWriter] = []
    try:
        written = _write_stages(folder, fetch, extents, plan, layout, args, padded_vocab, on_tensor, opened)
        for writer in opened:
            writer.wait()  # each stage's files were closed (and began their fsync) when the stage ended
    except BaseException:
        for writer in opened:
            writer.abort()
        raise
    return written


def _shard_extents(full: TensorExtents, spec: ShardSpec, rank: int, size: int,
                   padded_vocab: int) -> Optional[TensorExtents]:
    """shard_padded on extents: TP rank `rank`'s piece when it is whole rows (dim 0), else None."""
    full = full.pad_rows(padded_vocab) if spec.vocab else full
    if spec.axis != "tp":
        return full
    if spec.dim != 0 and size > 1:
        return None
    return cat_rows([full.rows(start, n) for start, n in spec.blocks(full.shape[0], rank, size)])


def _write_stages(folder: Path, fetch: Callable[[str], torch.Tensor],
                  extents: Optional[Callable[[str], Optional[TensorExtents]]], plan: dict[int, list["PlannedTensor"]],
                  layout: MegatronCheckpoint, args: Any, padded_vocab: int, on_tensor: Callable[[int], None],
                  opened: list[IncrementalTorchWriter]) -> list[Path]:
    par = layout.layout
    written = []
    ep_ranks = range(par.ep)
    budget = Budget()  # shared by the TP x EP files a stage writes together
    for p in range(par.pp):
        writers: dict[tuple[int, int], IncrementalTorchWriter] = {}
        states: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
        for e in ep_ranks:
            for t in range(par.tp):
                d = folder / rank_dir(t, p, par.pp, e, par.ep)
                d.mkdir(parents=True)
                writers[(t, e)] = IncrementalTorchWriter(d / FILE, budget)
                opened.append(writers[(t, e)])
                states[(t, e)] = {model_key(v, par.vpp): {} for v in range(par.vpp)}
        for entry in plan[p]:
            full = extents(entry.canonical) if extents is not None else None
            pieces = [_shard_extents(full, entry.spec, t, par.tp, padded_vocab) for t in range(par.tp)] \
                if full is not None else [None]
            if any(piece is None for piece in pieces):  # not whole rows: read the tensor and shard it
                full = fetch(entry.canonical)
                pieces = [shard_padded(full, entry.spec, *((t, par.tp) if entry.spec.axis == "tp" else (0, 1)),
                                       padded_vocab) for t in range(par.tp)]
            for t, piece in enumerate(pieces):
                for e, name in entry.targets:
                    state = states[(t, e)][entry.model]
                    state[name] = writers[(t, e)].tensor(piece)
                    extra = extra_state_name(name)
                    if extra:
                        state[extra] = None
            on_tensor(full.nbytes)
            del full, pieces
        for (t, e), writer in writers.items():
            if p == par.pp - 1:  # megatron's output layer has extra state even when its weight is tied
                states[(t, e)][model_key(par.vpp - 1, par.vpp)].setdefault("output_layer._extra_state", None)
            top = {"args": args, "checkpoint_version": 3.0,
                   "iteration": layout.iteration if isinstance(layout.iteration, int) else 0, **states[(t, e)]}
            writer.finish(top)
            written.append(writer.path)
    return written


@dataclass(frozen=True)
class PlannedTensor:
    """One canonical tensor's place in a stage's rank files: which chunk, which (EP rank, name)
    pairs, split over TP by `spec`."""

    canonical: str
    model: str
    targets: tuple[tuple[int, str], ...]
    spec: ShardSpec


def legacy_plan(names: Iterable[str], specs: dict[str, ShardSpec], layout: MegatronCheckpoint, num_layers: int,
                tied: bool, num_experts: int = 0) -> dict[int, list[PlannedTensor]]:
    """For each pipeline stage, every tensor its rank files get, in write order (no weights needed)."""
    par = layout.layout
    ranges = stage_layers(num_layers, par.pp, par.vpp, par.first_stage_layers, par.last_stage_layers)
    plan: dict[int, list[PlannedTensor]] = {p: [] for p in range(par.pp)}

    def add(p: int, v: int, name: str, local: str) -> None:
        ep_ranks, local = expert_placement(local, num_experts, par.ep)
        key = spelled(local, layout.spelling, layout.moe_grouped_gemm)
        spec = legacy_shard_spec(key, specs.get(name, ShardSpec()), layout.spelling)
        plan[p].append(PlannedTensor(name, model_key(v, par.vpp), tuple((e, key) for e in ep_ranks), spec))

    for name in names:
        p, v, local = placement(name, ranges)
        add(p, v, name, local)
        if tied and par.pp > 1 and name == "embedding.word_embeddings.weight":
            # Megatron keeps a copy of the tied embedding as output_layer on the last stage.
            add(par.pp - 1, par.vpp - 1, name, "output_layer.weight")
    return plan
