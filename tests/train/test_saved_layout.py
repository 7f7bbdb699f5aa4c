"""Training saves record the layout the run used (TP, PP, VPP, EP, uneven stage ends), and so does
the model card made from them: a run at EP2 no longer saves EP1, a TP2 finetune no longer TP1."""

from __future__ import annotations

import torch
from informative import informative

from mzoo.jobs.push import Request, write_card
from mzoo.jobs.sources import open_source
from mzoo.jobs.train import hooks
from mzoo.layout import Layout
from mzoo.models.canonical import random_canonical
from mzoo.zoo import resolve


def _save(cfg, layout: Layout, root, fmt: str, iteration: int = 7) -> dict[str, torch.Tensor]:
    tensors = dict(informative(random_canonical(cfg, seed=3)))  # a norm saved or read back as 1 would show
    extra_called = []
    save = hooks(layout, "fp32", lambda *a: None, fmt).save_checkpoint
    save(cfg, tensors, root, iteration, lambda folder: extra_called.append(folder))
    assert len(extra_called) == 1  # the optimizer-state callback ran inside the iteration folder
    return tensors


def test_a_moe_run_saves_at_its_expert_and_pipeline_layout(tmp_path):
    run = Layout(tp=2, pp=2, dp=2, ep=2)
    tensors = _save(resolve("mixtral-tiny"), run, tmp_path / "ck", "torch_dist")
    src = open_source(tmp_path / "ck")
    saved = src.megatron.layout
    assert (saved.tp, saved.pp, saved.vpp, saved.ep) == (2, 2, 1, 2)
    assert src.iteration == 7
    for name, value in tensors.items():
        assert torch.equal(src.get(name), value), name
    (tmp_path / "card").mkdir()
    card, generated = write_card(src, tmp_path / "card", _request())
    assert generated and "(TP 2, PP 2, VPP 1, EP 2, te parameter spelling, iteration 7)" in card


def test_legacy_saves_keep_uneven_stages_and_virtual_pipelines(tmp_path):
    run = Layout(tp=2, pp=2, dp=1, first_stage_layers=1, last_stage_layers=3)
    tensors = _save(resolve("llama-tiny").replace(num_layers=4), run, tmp_path / "ck", "torch")
    src = open_source(tmp_path / "ck")
    saved = src.megatron.layout
    assert (saved.tp, saved.pp, saved.first_stage_layers, saved.last_stage_layers) == (2, 2, 1, 3)
    assert sorted(p.name for p in (tmp_path / "ck" / "iter_0000007").glob("mp_rank_*")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    for name, value in tensors.items():
        assert torch.equal(src.get(name), value), name


def _request() -> Request:
    return Request("org/model", "main", "https://huggingface.co", False, True, "apache-2.0", None, None, None)
