"""Issue 17, case 10: the planner counts layers per kind (attention + MLP, attention + MoE, each hybrid
symbol) from the config's counts, never walking the layers, so a config claiming 10M layers is planned
at once; its numbers stay exactly those of the per-layer sum on every zoo preset and planner layout."""

from __future__ import annotations

import pytest

from mzoo.config import ConfigError, ModelConfig
from mzoo.layout import Layout
from mzoo.plan import costs
from mzoo.plan.costs import Model, block_flops, layer_blocks_of, model_flops_per_token, rank_params, stages
from mzoo.plan.memory import memory
from mzoo.plan.profile import engine_profile, megatron_profile
from mzoo.plan.settings import Settings
from mzoo.zoo import get, names

# every layout the planner tests use (tests/mzoo/test_plan.py), tried on every preset it can split
LAYOUTS = [
    Layout(), Layout(tp=2, pp=2, dp=1), Layout(tp=4, pp=4, vpp=2, dp=2), Layout(tp=8, pp=8, dp=1, first_stage_layers=15,
                                                                             last_stage_layers=15),
    Layout(tp=2, pp=2, dp=2, ep=2), Layout(tp=2, pp=4, dp=8, ep=8), Layout(tp=2, pp=3, dp=4, ep=4),
    Layout(tp=2, pp=3, dp=2, ep=2, first_stage_layers=9, last_stage_layers=9),
    Layout(tp=2, pp=16, dp=64, ep=64, first_stage_layers=4, last_stage_layers=1),
    Layout(tp=1, pp=1, cp=2, dp=4), Layout(tp=4, pp=4, vpp=5, cp=2, dp=2), Layout(tp=1, pp=4, vpp=8, ep=8, dp=16),
    Layout(tp=4, pp=4, ep=8, dp=16), Layout(tp=1, pp=4, dp=2), Layout(tp=1, pp=4, vpp=2, dp=2),
    Layout(tp=1, pp=8, vpp=4, dp=1), Layout(tp=2, pp=16, ep=64, etp=1, dp=32, first_stage_layers=4, last_stage_layers=1),
]
SETTINGS = [Settings(4096, 512), Settings(2048, 64, recompute="full", recompute_layers=1),
            Settings(4096, 4096, recompute="selective", grad_fp32=False)]


def walked_kinds(cfg: ModelConfig, ranges: tuple[range, ...]) -> list[tuple[tuple[str, ...], int]]:
    """The per-layer walk the planner did before: every layer's blocks, counted in order of appearance."""
    types = cfg.layer_types
    out: dict[tuple[str, ...], int] = {}
    for r in ranges:
        for i in r:
            blocks = layer_blocks_of(types[i], cfg, cfg.is_moe_layer(i))
            out[blocks] = out.get(blocks, 0) + 1
    return list(out.items())


def splittable(cfg: ModelConfig) -> list[Layout]:
    found = []
    for layout in LAYOUTS:
        try:
            layout.validate_for(cfg)
            stages(cfg, layout)
        except ConfigError:
            continue
        found.append(layout)
    return found


@pytest.mark.parametrize("name", names())
def test_kinds_equal_the_per_layer_walk_on_every_preset(name, monkeypatch):
    """Memory (every part, every stage), per-rank parameters and FLOPs per token equal what the walk gives."""
    cfg = get(name).config
    layouts = splittable(cfg)
    assert layouts  # at least the single-rank layout
    profiles = [engine_profile("bf16", True, "cuda"), engine_profile("fp32", False, "cpu"), megatron_profile("bf16")]
    counted = {}
    for layout in layouts:
        for settings in SETTINGS:
            for profile in profiles:
                counted[layout, settings, profile.name] = memory(cfg, layout, settings, profile).as_dict()
        for p in range(layout.pp):
            counted[layout, p] = rank_params(cfg, layout, p)
        assert [Model(cfg).kinds(s.ranges) for s in stages(cfg, layout)] == \
            [walked_kinds(cfg, s.ranges) for s in stages(cfg, layout)]
    flops = model_flops_per_token(cfg, 4096)

    monkeypatch.setattr(Model, "kinds", lambda self, ranges: walked_kinds(self.cfg, ranges))
    for layout in layouts:
        for settings in SETTINGS:
            for profile in profiles:
                assert memory(cfg, layout, settings, profile).as_dict() == counted[layout, settings, profile.name], \
                    (name, layout.label(), settings, profile.name)
        for p in range(layout.pp):
            assert rank_params(cfg, layout, p) == counted[layout, p]
    fwd = 2.0 * cfg.hidden_size * cfg.vocab_size
    for i, kind in enumerate(cfg.layer_types):
        for block in layer_blocks_of(kind, cfg, cfg.is_moe_layer(i)):
            f = block_flops(cfg, block, 4096)
            fwd += f.gemm + f.core
    assert flops == pytest.approx(3.0 * fwd, rel=1e-12)


@pytest.mark.parametrize("name", ["llama-tiny", "deepseek-tiny", "mamba-hybrid-tiny", "mamba-tiny", "gpt-oss-tiny"])
def test_ten_million_layers_are_planned_without_listing_them(name, monkeypatch):
    """The config's per-layer list (`layer_types`, 10M entries) is never asked for: memory, per-rank
    parameters and FLOPs come from counts (a walk took minutes here)."""
    cfg = get(name).config
    n = 10_000_000
    if cfg.ssm is not None and cfg.ssm.hybrid_pattern:
        cfg = cfg.replace(num_layers=n, **{"ssm.hybrid_pattern": (cfg.ssm.hybrid_pattern * n)[:n]})
    else:
        cfg = cfg.replace(num_layers=n)
    monkeypatch.setattr(ModelConfig, "layer_types", property(lambda self: pytest.fail("walked the layers")))
    layout = Layout(tp=1, pp=4, vpp=2, dp=2, ep=2 if cfg.moe else 1)
    mem = memory(cfg, layout, Settings(4096, 512), engine_profile("bf16", False, "cuda"))
    small = memory(cfg.replace(num_layers=8, **({"ssm.hybrid_pattern": cfg.ssm.hybrid_pattern[:8]}
                                                if cfg.ssm and cfg.ssm.hybrid_pattern else {})),
                   layout, Settings(4096, 512), engine_profile("bf16", False, "cuda"))
    assert mem.weights > small.weights * 100_000
    assert rank_params(cfg, layout, 0).total > 0 and model_flops_per_token(cfg, 4096) > 0
    assert costs.count_params(cfg).total > 0
