"""Which global layers each pipeline stage (and virtual stage) holds, as Megatron assigns them."""

from __future__ import annotations

from typing import Optional

from mzoo.config import ConfigError


def stage_layers(
    num_layers: int, pp: int, vpp: int = 1, first: Optional[int] = None, last: Optional[int] = None
) -> list[list[range]]:
    """ranges[pp_rank][vp_stage] of global layer indices.

    Uniform split: chunk (p, v) starts at v * L/vpp + p * L/(pp*vpp) (Megatron's interleaving).
    `first` / `last` pin the first / last stage's layer count (Megatron's
    --decoder-first/last-pipeline-num-layers); the rest split evenly over the middle stages.
    """
    if first is None and last is None:
        if num_layers % (pp * vpp):
            hint = suggest_uneven(num_layers, pp) if vpp == 1 else None
            tip = (f"set the first/last stage sizes, e.g. --first-stage-layers {hint[0]} --last-stage-layers {hint[1]}"
                   if hint else "pick sizes that divide the layer count")
            raise ConfigError(f"{num_layers} layers do not split evenly over pp={pp} x vpp={vpp}; {tip}.")
        per = num_layers // (pp * vpp)
        return [[range(v * num_layers // vpp + p * per, v * num_layers // vpp + (p + 1) * per) for v in range(vpp)]
                for p in range(pp)]
    if vpp != 1:
        raise ConfigError("uneven first/last pipeline stages cannot be combined with virtual stages (vpp > 1).")
    counts = _uneven_counts(num_layers, pp, first, last)
    out, start = [], 0
    for n in counts:
        out.append([range(start, start + n)])
        start += n
    return out


def suggest_uneven(num_layers: int, pp: int) -> Optional[tuple[int, int]]:
    """First/last stage sizes that let the middle stages split the rest evenly (lighter ends,
    where the embedding and the loss live), or None."""
    if pp < 3:
        return None
    for per in (-(-num_layers // pp), num_layers // pp):
        rest = num_layers - per * (pp - 2)
        if per >= 1 and rest >= 2:
            return rest // 2, rest - rest // 2
    return None


def _uneven_counts(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> list[int]:
    if pp == 1:
        raise ConfigError("first/last pipeline stage sizes need pp > 1.")
    pinned = [first, last]
    middle_stages = pp - sum(x is not None for x in pinned)
    rest = num_layers - sum(x for x in pinned if x is not None)
    if rest < 0 or any(x is not None and x < 1 for x in pinned):
        raise ConfigError(f"first/last stage sizes {first}/{last} do not fit {num_layers} layers.")
    if middle_stages == 0:
        if rest:
            raise ConfigError(f"first ({first}) + last ({last}) stage sizes must add up to {num_layers} layers with pp=2.")
        return [first, last]
    if rest % middle_stages or rest == 0:
        raise ConfigError(
            f"the {rest} layers left after the first/last stages do not split evenly over {middle_stages} stages."
        )
    per = rest // middle_stages
    counts = [per] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def layer_owner(ranges: list[list[range]], layer: int) -> tuple[int, int, int]:
    """(pp_rank, vp_stage, local index) holding a global layer."""
    for p, chunks in enumerate(ranges):
        for v, r in enumerate(chunks):
            if layer in r:
                return p, v, layer - r.start
    raise KeyError(f"layer {layer} is in no pipeline stage")
