"""`--compile`: each decoder layer torch.compile'd (inductor, built with gcc on this CPU) trains as
eager does, shares one graph across identical layers, keeps canonical parameter names, and leaves
dropout (and the TP-aware RNG streams) to eager, so the masks are eager's.

Bounds: inductor fuses and reorders float operations (reductions, a*b+c), so bitwise equality is
not promised. Measured on this CPU over 4 steps of llama-tiny (2 layers): fp32 losses differ by at
most 4.8e-7 (0.0 with dropout, and for the hybrid Mamba model), first-step gradients by 3.8e-7
relative; the bounds are 5e-6 and 2e-6, an order above, and far below what a different dropout mask
moves the losses (dropout 0.2 changes them by 6e-3). bf16 rounds every op's output to 8 mantissa
bits, so a reordered sum can flip a rounding: measured 3e-4 in the loss and 9e-3 relative in the
gradients (about one bf16 ulp); the bounds are 2e-3 and 3e-2.
The file takes ~3 min with a cold inductor cache on the shared 2-core machine (hybrid 54 s, TP2 42 s,
fp32 31 s, bf16 19 s, dropout 13 s, selective 10 s), ~1.5 min when inductor's on-disk cache has it.
"""

from __future__ import annotations

import dist as D
import pytest
import torch
from torch._dynamo.utils import counters

from informative import perturb_model_
from mzoo.config import ConfigError
from mzoo.data.gpt import MockGPTDataset
from mzoo.layout import Layout
from mzoo.models import build_chunks
from mzoo.parallel.state import ParallelState
from mzoo.train.trainer import TrainConfig, Trainer
from mzoo.zoo import resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_LOSS, FP32_GRAD, BF16_LOSS, BF16_GRAD = 5e-6, 2e-6, 2e-3, 3e-2


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No compiled code from an earlier test: each test compiles (and counts its graphs) itself."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _cfg(**over):
    return resolve("llama-tiny").replace(num_layers=2, **over)


def _model(cfg, compile: bool, precision: str, state: ParallelState | None = None):
    torch.manual_seed(0)
    model = build_chunks(cfg, state or ParallelState.single(), dtype=DTYPES[precision])
    model.init_weights(seed=2)
    with torch.no_grad():
        perturb_model_(model[0], seed=5)  # norms not all ones
    return model


def _train(cfg, compile: bool, precision: str = "fp32", recompute: str = "none", modules: tuple = (),
           steps: int = 4, state: ParallelState | None = None) -> list[float]:
    state = state or ParallelState.single()
    model = _model(cfg, compile, precision, state)
    tcfg = TrainConfig(seq_len=32, micro_batch=2, global_batch=4, steps=steps, lr=3e-3, precision=precision,
                       recompute=recompute, recompute_modules=modules, compile=compile)
    trainer = Trainer(model, cfg, state, tcfg, MockGPTDataset(cfg.vocab_size, 32, seed=3))
    return [log.loss for log in trainer.train()]


def _grads(cfg, compile: bool, precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Gradients of one forward/backward (the micro-batch shape training uses: the same graph).
    Parameters after Adam steps are no measure: Adam divides by sqrt(v), so a 1e-8 change in a
    near-zero gradient can move its update by up to the learning rate."""
    model = _model(cfg, compile, precision)
    if compile:
        model.compile_layers()
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    model[0](ids[:, :-1], labels=ids[:, 1:]).float().mean().backward()
    return {name: p.grad.float() for name, p in model.canonical_parameters()}


def _worst_grad(a: dict, b: dict) -> float:
    """The largest per-tensor relative difference |a - b| / |b| (Frobenius norms)."""
    assert a.keys() == b.keys()  # canonical names survive compilation
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in a)


def _graphs() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_compiled_layers_train_as_eager_fp32():
    cfg = _cfg()
    eager = _train(cfg, False)
    assert _graphs() == (0, 0)
    compiled = _train(cfg, True)
    assert _graphs() == (1, 0)  # both layers run one compiled graph, whole
    assert compiled == pytest.approx(eager, rel=0, abs=FP32_LOSS)
    assert len(set(eager)) == len(eager)  # every step moved the weights: the comparison means something
    assert _worst_grad(_grads(cfg, True), _grads(cfg, False)) < FP32_GRAD
    assert _graphs() == (1, 0)  # the same graph again: same shapes


def test_compiled_layers_train_as_eager_bf16():
    cfg = _cfg()
    eager, compiled = _train(cfg, False, "bf16"), _train(cfg, True, "bf16")
    assert _graphs() == (1, 0)
    assert compiled == pytest.approx(eager, rel=0, abs=BF16_LOSS)
    assert _worst_grad(_grads(cfg, True, "bf16"), _grads(cfg, False, "bf16")) < BF16_GRAD


def test_dropout_stays_eager_and_draws_eager_masks():
    """Dropout runs between graphs (a graph break per call), from the same generators in the same
    order: the losses match eager's at the fp32 bound, with and without full recomputation (which
    replays the RNG streams around the compiled layer)."""
    cfg = _cfg(hidden_dropout=0.2, attention_dropout=0.2)
    for recompute in ("none", "full"):
        eager, compiled = _train(cfg, False, recompute=recompute), _train(cfg, True, recompute=recompute)
        assert compiled == pytest.approx(eager, rel=0, abs=FP32_LOSS), recompute
    graphs, breaks = _graphs()
    assert graphs >= 1 and breaks > 0
    assert eager != pytest.approx(_train(_cfg(), False), abs=1e-3)  # dropout changes the losses


def test_selective_recompute_is_traced_inside_the_compiled_layer():
    cfg = _cfg()
    eager = _train(cfg, False, "fp32", "selective", ("core_attn", "mlp"))
    compiled = _train(cfg, True, "fp32", "selective", ("core_attn", "mlp"))
    assert _graphs() == (1, 0)
    assert compiled == pytest.approx(eager, rel=0, abs=FP32_LOSS)


def test_compiled_tp2_sequence_parallel_matches_eager_single_process():
    """Two gloo ranks, TP2 with sequence parallelism: the all-gathers and reduce-scatters inside the
    compiled layers give one eager process's losses."""
    cfg = _cfg()
    eager = _train(cfg, False, steps=3)
    got = D.run(_tp_sp_worker, 2, timeout=900)
    for losses in got:
        assert losses == pytest.approx(eager, rel=0, abs=FP32_LOSS)


def _tp_sp_worker(rank: int, world: int) -> list[float]:
    state = ParallelState.build(Layout(tp=world, sequence_parallel=True))
    torch._dynamo.reset()
    losses = _train(_cfg(), True, state=state, steps=3)
    assert _graphs()[0] >= 1
    return losses


def test_hybrid_mamba_layers_compile_one_graph_per_kind():
    """M*-M: Mamba, attention and MLP layers, one graph per kind, shared by both Mamba layers."""
    cfg = resolve("mamba-hybrid-tiny")
    eager, compiled = _train(cfg, False, steps=3), _train(cfg, True, steps=3)
    assert _graphs() == (3, 0)
    assert compiled == pytest.approx(eager, rel=0, abs=FP32_LOSS)


def test_refusals_are_one_sentence():
    with pytest.raises(ConfigError, match="--compile cannot recompute core attention with attention dropout"):
        TrainConfig(recompute="selective", compile=True).validate_compile(_cfg(attention_dropout=0.1))
    TrainConfig(recompute="selective", recompute_modules=("mlp",), compile=True).validate_compile(
        _cfg(attention_dropout=0.1))  # the MLP draws no random numbers: fine
    for preset, blocks in (("mixtral-tiny", "mixture-of-experts"),
                           ("deepseek-tiny", "mixture-of-experts and multi-latent attention")):
        with pytest.raises(ConfigError, match=f"not {preset}'s {blocks} layers; drop --compile"):
            TrainConfig(compile=True).validate_compile(resolve(preset))
    TrainConfig(compile=True).validate_compile(resolve("mamba-hybrid-tiny"))
