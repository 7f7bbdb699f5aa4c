"""Megatron's parameter names: the TE (canonical) and local spellings, expert spellings, the
`_extra_state` entries of linear modules, and Mamba mixer sections stored as separate keys."""

from __future__ import annotations

import re
from typing import Optional

from mzoo.ckpt.megatron.checkpoint import Spelling
from mzoo.parallel.sharding import ShardSpec

# ---- spellings: TE (canonical) <-> local ----------------------------------------------------------
# Layer-relative names (after `decoder.layers.N.`) whose local-spec module differs from the TE one.
_TE_TO_LOCAL = [
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
    # MLA: TE fuses the latent norms into the up projections; the local spec has separate modules
    ("self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.q_layernorm.weight"),
    ("self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.kv_layernorm.weight"),
    # Mamba layer: TE fuses the layer's pre-norm into the mixer's in_proj; the local spec keeps MambaLayer.norm
    ("mixer.in_proj.layer_norm_weight", "norm.weight"),
    ("mixer.in_proj.layer_norm_bias", "norm.bias"),
]
# megatron-core's local (non-MLA) TransformerLayer saves these modules under TE keys
# (sharded_state_dict_keys_map); its local MLA layer has no such map.
_LOCAL_SHARDED_KEYS = [("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                       ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")]


def _swap_suffix(name: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if name == old or name.endswith("." + old):
            return name[: len(name) - len(old)] + new
    return name


def to_spelling(name: str, spelling: Spelling) -> str:
    """Canonical (TE) name -> the module (state-dict) name of that spelling."""
    return name if spelling == "te" else _swap_suffix(name, _TE_TO_LOCAL)


def dist_spelling(name: str, spelling: Spelling, mla: bool, hybrid: bool = False) -> str:
    """Canonical name -> the key megatron-core's sharded_state_dict gives it in torch_dist/zarr.

    Dense layers: the TE names in both specs. Local-spec MoE layers (Mixtral) keep their separate
    pre-MLP norm under `mlp.linear_fc1.layer_norm_weight`; local-spec MLA layers keep their module
    names (`input_layernorm`, `pre_mlp_layernorm`, `q_layernorm`, `kv_layernorm`). Mamba/hybrid
    stacks: the canonical names in both specs (megatron-core's local Mamba spec, in
    post_training/modelopt, maps `norm.` to `mixer.in_proj.layer_norm_` and its MoE layers keep
    `pre_mlp_layernorm`)."""
    if spelling == "te" or hybrid:
        return name
    local = to_spelling(name, "local")
    if mla:
        return local
    head, rest = _split_layer(local)
    for module, key in _LOCAL_SHARDED_KEYS:
        if rest.startswith(module):
            return head + key + rest[len(module):]
    return local


def _split_layer(name: str) -> tuple[str, str]:
    m = re.match(r"((?:decoder\.layers\.)(?:\d+\.)?)(.+)$", name)
    return (m.group(1), m.group(2)) if m else ("", name)


# ---- experts: SequentialMLP (canonical) <-> TEGroupedMLP spelling, torch_dist keys ----------------
_SEQUENTIAL = re.compile(r"^(?P<head>(?:.*\.)?mlp\.experts\.)local_experts\.(?P<i>\d+)\.(?P<mod>linear_fc[12])\.(?P<p>weight|bias)$")
_GROUPED = re.compile(r"^(?P<head>(?:.*\.)?mlp\.experts\.)(?P<mod>linear_fc[12])\.(?P<p>weight|bias)(?P<i>\d+)$")


def grouped_spelling(name: str) -> str:
    """`...experts.local_experts.{i}.linear_fc1.weight` -> `...experts.linear_fc1.weight{i}` (TEGroupedMLP)."""
    m = _SEQUENTIAL.match(name)
    return f"{m['head']}{m['mod']}.{m['p']}{m['i']}" if m else name


def expert_dist_key(name: str) -> tuple[str, Optional[int]]:
    """`...mlp.experts.local_experts.{e}.X` -> (`...mlp.experts.experts.X`, e): megatron-core stores
    every expert of a layer under one key with a leading global expert axis."""
    m = _SEQUENTIAL.match(name)
    if m is None:
        return name, None
    return f"{m['head']}experts.{m['mod']}.{m['p']}", int(m["i"])


_LINEAR = re.compile(r"(?:^|\.)(linear_qkv|linear_proj|linear_fc1|linear_fc2|output_layer|linear_q_proj|linear_q_down_proj"
                     r"|linear_q_up_proj|linear_kv_down_proj|linear_kv_up_proj|mixer\.in_proj|mixer\.out_proj)"
                     r"\.weight(?:\d*|\.(?:z|x|B|C|dt))$")


def extra_state_name(name: str) -> Optional[str]:
    """Megatron's linear modules add `<module>._extra_state` to state dicts; strict loads expect it.
    (Norms, the MoE router, conv1d and Mamba-1's x_proj/dt_proj are not such modules; a grouped
    expert linear has one for all experts; a split Mamba in_proj key has its module's.)"""
    m = _LINEAR.search(name)
    return name[: m.start(1)] + m.group(1) + "._extra_state" if m else None


# megatron-core's MambaMixer.sharded_state_dict stores in_proj and conv1d as one torch_dist key per
# section (_split_tensor_factory: `in_proj.weight.z`, ...); Mamba-1's [x; z] in_proj is mzoo's own.
_SECTION_NAMES = {("in_proj", 5): ("z", "x", "B", "C", "dt"), ("in_proj", 2): ("x", "z"),
                  ("conv1d", 3): ("x", "B", "C")}
_MIXER_SPLIT = re.compile(r"(?:^|\.)mixer\.(in_proj|conv1d)\.(?:weight|bias)$")


def split_sections(name: str, spec: ShardSpec) -> Optional[tuple[str, ...]]:
    """Section names of a Mamba mixer tensor that torch_dist/zarr store as separate keys
    (`<key>.<section>`, each section global), from its ShardSpec's sections; None for the rest."""
    m = _MIXER_SPLIT.search(name)
    if m is None or not spec.sections:
        return None
    return _SECTION_NAMES.get((m.group(1), len(spec.sections)))


def legacy_shard_spec(name: str, spec: ShardSpec, spelling: Spelling) -> ShardSpec:
    """How a tensor splits in a legacy rank file of this spelling. megatron-core's local MLA spec
    builds the latent down projections as ColumnParallelLinear (rows split over TP, gathered after);
    TE builds them duplicated, as the canonical ShardSpec says."""
    if spelling == "local" and re.search(r"self_attention\.linear_(q|kv)_down_proj\.weight$", name):
        return ShardSpec("tp", 0)
    return spec
