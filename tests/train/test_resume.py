"""Stop-and-resume continues the loss curve exactly (fp32), also in another layout, and training
checkpoints are real Megatron checkpoints with a tracker that moves last."""

from __future__ import annotations

import dist as D
import pytest
import torch

from mzoo.config import ModelConfig
from mzoo.jobs.train import hooks, pretraining_samplers
from mzoo.layout import Layout
from mzoo.train.run import RunConfig, run
from mzoo.train.trainer import TrainConfig

CFG = ModelConfig(name="t", family="llama", vocab_size=250, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64)


def _rc(layout: Layout, **kw) -> RunConfig:
    tcfg = TrainConfig(seq_len=16, micro_batch=2, global_batch=8, steps=10, lr=3e-3, min_lr=3e-4, warmup=2,
                       distributed_optimizer=kw.pop("dist_opt", False))
    return RunConfig(CFG, layout, tcfg, **kw)


def _losses(rc: RunConfig) -> list[float]:
    torch.set_num_threads(1)
    return [log.loss for log in run(rc, hooks(rc.layout, rc.train.precision, pretraining_samplers(None)))]


def _dist_worker(rank, world, layout, load, dist_opt):
    return _losses(_rc(Layout(**layout), load=load, dist_opt=dist_opt))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "root"
    full = _losses(_rc(Layout(), save=str(root), save_interval=5))
    return root, full


def test_training_checkpoints_are_megatron_checkpoints(interrupted):
    root, _ = interrupted
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (root / "iter_0000005" / "metadata.json").exists() and (root / "iter_0000010" / "metadata.json").exists()
    assert not list(root.glob(".*mzoo-tmp"))


def test_resume_is_exact(interrupted):
    root, full = interrupted
    resumed = _losses(_rc(Layout(), load=str(root / "iter_0000005")))
    assert len(resumed) == 5
    assert resumed == full[5:]  # bit-identical in fp32


@pytest.mark.dist
@pytest.mark.parametrize("layout, dist_opt", [(dict(tp=2), False), (dict(dp=2), True), (dict(pp=2), False)],
                         ids=["tp2", "dp2-distopt", "pp2"])
def test_resume_in_another_layout_continues_the_curve(interrupted, layout, dist_opt):
    root, full = interrupted
    for resumed in D.run(_dist_worker, 2, layout, str(root / "iter_0000005"), dist_opt):
        assert max(abs(a - b) for a, b in zip(resumed, full[5:])) <= 1e-5


DROPOUT = CFG.replace(hidden_dropout=0.1, attention_dropout=0.1)


def test_resume_with_dropout_is_exact(tmp_path):
    """Dropout streams (default and TP-aware) are saved per rank and restored."""
    root = tmp_path / "root"
    rc = _rc(Layout(), save=str(root), save_interval=5)
    rc.model = DROPOUT
    full = _losses(rc)
    again = _rc(Layout(), load=str(root / "iter_0000005"))
    again.model = DROPOUT
    assert _losses(again) == full[5:]
