"""Token dispatch of the mixture-of-experts layer (mzoo/parallel/experts.py, models/moe.py Experts).

- Every (token, k) copy reaches its expert exactly once: outputs and gradients (tokens, routing
  weights, expert weights) against a dense per-token computation that never sorts, for uneven
  routing with an expert that gets no token, in one process and over EP 2 and 4 on gloo ranks.
- Deterministic by construction: no scatter-add (index_add / scatter_add / accumulating
  index_put, GPU atomics) in the forward or backward, and two runs bitwise equal.
- One host sync per MoE layer forward (the split sizes), none in the backward.
- `torch._grouped_mm` against the per-expert loop (fp32 and bf16, an empty group), the
  device/dtype decision, and the zero-copy weight stack on the optimizer's parameter buffer.
"""

from __future__ import annotations

import dist as D
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mzoo.layout import Layout
from mzoo.models import build_model
from mzoo.models.moe import Experts, MoELayer
from mzoo.parallel import experts as E
from mzoo.parallel.optimizer import AdamWConfig, Optimizer
from mzoo.parallel.state import ParallelState
from mzoo.zoo import resolve

EXPERTS, TOP_K, TOKENS = 8, 2, 24
EMPTY = 5  # the expert no token picks


def _cfg(ffn: int = 32):
    base = resolve("mixtral-tiny")  # hidden 64, SwiGLU
    return base.replace(**{"moe.num_experts": EXPERTS, "moe.top_k": TOP_K, "moe.ffn_hidden_size": ffn})


def _global_weights(cfg, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f = cfg.hidden_size, cfg.moe.ffn_hidden_size
    return torch.randn(EXPERTS, 2 * f, h, generator=g) * 0.2, torch.randn(EXPERTS, h, f, generator=g) * 0.2


def _experts(cfg, state: ParallelState) -> Experts:
    """This EP rank's experts, holding global experts ep_rank * E/EP + i of `_global_weights`."""
    experts = Experts(cfg, state)
    w1, w2 = _global_weights(cfg)
    first = state.ep_rank * len(experts.local_experts)
    with torch.no_grad():
        for i, e in enumerate(experts.local_experts):
            e.linear_fc1.weight.copy_(w1[first + i])
            e.linear_fc2.weight.copy_(w2[first + i])
    return experts


def _batch(rank: int, hidden: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tokens with uneven routing: expert 0 takes most tokens, EMPTY none, each token
    two distinct experts; routing weights positive, not summing to one."""
    g = torch.Generator().manual_seed(100 + rank)
    share = torch.ones(EXPERTS)
    share[0], share[EMPTY] = 6.0, 0.0
    indices = torch.multinomial(share.expand(TOKENS, EXPERTS), TOP_K, replacement=False, generator=g)
    return {"x": torch.randn(TOKENS, hidden, generator=g), "w": torch.rand(TOKENS, TOP_K, generator=g) + 0.1,
            "indices": indices, "c": torch.randn(TOKENS, hidden, generator=g)}


def _dense(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Each token through its own experts' weights, one copy at a time: no sort, no split, no gather."""
    out = torch.zeros_like(x)
    for j in range(indices.shape[1]):
        gate, up = torch.einsum("th,tfh->tf", x, w1[indices[:, j]]).chunk(2, dim=-1)
        out = out + w[:, j : j + 1] * torch.einsum("tf,thf->th", F.silu(gate) * up, w2[indices[:, j]])
    return out


def _routed(state: ParallelState, experts: Experts, batch: dict) -> dict[str, torch.Tensor]:
    x, w = batch["x"].clone().requires_grad_(), batch["w"].clone().requires_grad_()
    out = E.routed_experts(x, w, batch["indices"], EXPERTS, state, experts)
    (out * batch["c"]).sum().backward()
    grads = {f"{kind}.{i}": getattr(e, kind).weight.grad.clone()
             for i, e in enumerate(experts.local_experts) for kind in ("linear_fc1", "linear_fc2")}
    experts.zero_grad(set_to_none=True)
    return {"out": out.detach(), "x": x.grad, "w": w.grad, **grads}


def _reference(cfg, ranks: int, rank: int, local: int) -> dict[str, torch.Tensor]:
    """The dense computation of every rank's tokens: this rank's outputs and token grads, and the
    grads of this EP rank's experts, which collect the tokens of all ranks."""
    w1, w2 = (t.requires_grad_() for t in _global_weights(cfg))
    mine = {}
    for r in range(ranks):
        batch = _batch(r, cfg.hidden_size)
        x, w = batch["x"].requires_grad_(), batch["w"].requires_grad_()
        out = _dense(x, w, batch["indices"], w1, w2)
        (out * batch["c"]).sum().backward()
        if r == rank:
            mine = {"out": out.detach(), "x": x.grad, "w": w.grad}
    first = rank * local
    for i in range(local):
        mine[f"linear_fc1.{i}"], mine[f"linear_fc2.{i}"] = w1.grad[first + i], w2.grad[first + i]
    return mine


def _worst(got: dict, want: dict) -> dict[str, float]:
    """Largest difference per tensor, relative to the tensor's largest value (at least 1)."""
    assert got.keys() == want.keys()
    return {k: (got[k] - want[k]).abs().max().item() / max(1.0, want[k].abs().max().item()) for k in want}


def _ep_worker(rank: int, world: int) -> dict:
    cfg = _cfg()
    state = ParallelState.build(Layout(dp=world, ep=world))
    experts = _experts(cfg, state)
    experts.grouped_gemm = True  # on the CPU only when asked for
    batch = _batch(rank, cfg.hidden_size)
    first, second = _routed(state, experts, batch), _routed(state, experts, batch)
    return {"worst": _worst(first, _reference(cfg, world, rank, EXPERTS // world)),
            "bitwise": all(torch.equal(first[k], second[k]) for k in first),
            "grouped": experts.uses_grouped_gemm(batch["x"])}


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-gemm", "loop"])
def test_every_copy_reaches_its_expert_once_in_one_process(grouped):
    cfg = _cfg()
    state = ParallelState.single()
    experts = _experts(cfg, state)
    experts.grouped_gemm = grouped
    batch = _batch(0, cfg.hidden_size)
    assert experts.uses_grouped_gemm(batch["x"]) == grouped
    worst = _worst(_routed(state, experts, batch), _reference(cfg, 1, 0, EXPERTS))
    assert max(worst.values()) <= 1e-5, worst
    assert worst[f"linear_fc1.{EMPTY}"] == 0.0  # the expert that got no token has a zero gradient


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_every_copy_reaches_its_expert_once_over_expert_parallel_ranks(world):
    for rank, result in enumerate(D.run(_ep_worker, world)):
        assert result["grouped"]  # 4 and 2 local experts: the grouped path is what runs
        assert max(result["worst"].values()) <= 1e-5, (rank, result["worst"])
        assert result["bitwise"], rank


class _ScatterAdds(TorchDispatchMode):
    """Records the aten ops that add into rows by index: on GPUs these are atomic adds whose
    order, and so whose rounding, changes from run to run."""

    NAMES = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
             "index_reduce", "index_reduce_", "embedding_dense_backward"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        accumulate = name in ("index_put", "index_put_", "_index_put_impl_") and (
            kwargs.get("accumulate") or (len(args) > 3 and args[3]))
        if name in self.NAMES or accumulate:
            self.seen.append(name)
        return func(*args, **kwargs)


def test_dispatch_and_combine_add_nothing_by_index():
    cfg = _cfg()
    state = ParallelState.single()
    experts = _experts(cfg, state)
    batch = _batch(0, cfg.hidden_size)
    with _ScatterAdds() as mode:
        result = _routed(state, experts, batch)
    assert mode.seen == []
    assert torch.equal(result["out"], _routed(state, experts, batch)["out"])


class _HostSyncs(TorchFunctionMode):
    """Counts the tensor calls that make the host wait for the device (a D2H copy of a value)."""

    NAMES = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "nonzero", "numpy", "unique"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.NAMES or (name == "repeat_interleave" and kwargs.get("output_size") is None):
            self.count += 1
        return func(*args, **kwargs)


def _syncs_worker(rank: int, world: int) -> tuple[int, int]:
    cfg = _cfg()
    state = ParallelState.build(Layout(dp=world, ep=world)) if world > 1 else ParallelState.single()
    layer = MoELayer(cfg, state)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    x = torch.randn(6, 4, cfg.hidden_size, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    with _HostSyncs() as forward:
        out = layer(x)
    with _HostSyncs() as backward:
        out.square().sum().backward()
    return forward.count, backward.count


@pytest.mark.dist
def test_one_host_sync_per_layer_forward_none_backward():
    assert _syncs_worker(0, 1) == (1, 0)
    for counts in D.run(_syncs_worker, 2):
        assert counts == (1, 0)


@pytest.mark.parametrize("biased", [False, True], ids=["", "biases"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_the_per_expert_loop(dtype, biased):
    """The layer's grouped path, the same padded to 8 rows per group as on CUDA, and the loop; with
    GPT-OSS's expert biases and clamped GLU too (bias gradients: per-group row sums)."""
    cfg = _cfg(ffn=48)
    if biased:
        # the clamp cuts in fp32; in bf16 a value rounded across it would flip its gradient
        cfg = cfg.replace(add_bias_linear=True, activation="quick_geglu", glu_linear_offset=1.0,
                          activation_func_clamp_value=0.3 if dtype == torch.float32 else 7.0)
    experts = Experts(cfg, ParallelState.single(), dtype=dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
    sizes = [5, 0, 9, 2, 0, 7, 1, 8]  # uneven, two experts with no rows, one already a multiple of 8
    x = torch.randn(sum(sizes), cfg.hidden_size, generator=torch.Generator().manual_seed(5)).to(dtype)
    g = torch.randn(sum(sizes), cfg.hidden_size, generator=torch.Generator().manual_seed(6)).to(dtype)

    counts = torch.tensor(sizes)

    def padded(xi: torch.Tensor) -> torch.Tensor:
        """The CUDA padding, under a meta default device: a tensor it made without device= fails."""
        fc1, fc2 = ([getattr(e, k).weight for e in experts.local_experts] for k in ("linear_fc1", "linear_fc2"))
        b1, b2 = ([getattr(e, k).bias for e in experts.local_experts] if biased else None
                  for k in ("linear_fc1", "linear_fc2"))
        with torch.device("meta"):
            out = E.grouped_mlp(xi, sizes, counts, fc1, fc2, experts._ffn, row_multiple=8, fc1_bias=b1, fc2_bias=b2)
            out.backward(g)
        return out

    runs = {}
    for name in ("grouped", "padded", "loop"):
        experts.grouped_gemm = name != "loop"
        assert experts.uses_grouped_gemm(x) == (name != "loop")
        xi = x.clone().requires_grad_()
        if name == "padded":
            out = padded(xi)
        else:
            out = experts(xi, sizes, counts)
            out.backward(g)
        runs[name] = [out.detach(), xi.grad, *(p.grad.clone() for p in experts.parameters())]
        experts.zero_grad(set_to_none=True)
    fp32 = dtype == torch.float32  # unpadded fp32: the same products summed in the same order
    exact = 0 if not biased else 1e-6  # biases: added after the product, summed per group (the loop fuses them)
    for name, atol in (("grouped", exact if fp32 else 1e-2), ("padded", 1e-5 if fp32 else 1e-2)):
        for a, b in zip(runs[name], runs["loop"]):
            if biased and not fp32:  # (up + 1) * act(gate) reaches 13 (bf16 steps of 1/16): relative to the size
                assert (a - b).float().norm() <= 1e-2 * b.float().norm()
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_grouped_gemm_decision():
    bf16, fp32 = torch.bfloat16, torch.float32
    allowed = E.grouped_gemm_allowed
    assert allowed("cuda", bf16, (9, 0), (4096, 14336)) and allowed("cuda", bf16, (10, 0), (64, 96))
    assert not allowed("cuda", bf16, (8, 0), (64, 96))  # no CUTLASS kernel: torch would loop after a sync
    assert not allowed("cuda", fp32, (9, 0), (64, 96))  # bf16 only on CUDA
    assert allowed("cpu", fp32, None, (64, 96)) and allowed("cpu", bf16, None, (64, 96))
    assert not allowed("cpu", bf16, None, (64, 20))  # 40-byte rows: the kernel wants 16-byte strides
    assert not allowed("cpu", torch.float64, None, (64, 96)) and not allowed("mps", bf16, None, (64, 96))
    assert E.grouped_gemm_supported(torch.device("cpu"), fp32, (64, 96))
    odd = Experts(_cfg(ffn=30), ParallelState.single())  # 120-byte fp32 rows: the loop runs instead
    assert not odd.uses_grouped_gemm(torch.zeros(1, 64))


def test_expert_weights_stack_without_a_copy_on_the_optimizer_buffer():
    """The optimizer makes every parameter a view of one buffer, so each linear's expert weights
    sit at a constant distance and the stack is a view of them; the gradients are the same."""
    cfg = _cfg()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    models = []
    for with_optimizer in (False, True):
        model = build_model(cfg)
        model.init_weights(seed=3)
        if with_optimizer:
            Optimizer(model, ParallelState.single(), AdamWConfig())
        model(ids).square().mean().backward()
        models.append(model)
    plain, packed = (m.decoder.layers[0].mlp.experts.local_experts for m in models)
    for kind in ("linear_fc1", "linear_fc2"):
        separate = [getattr(e, kind).weight for e in plain]
        assert E.stack_weights(separate).data_ptr() != separate[0].data_ptr()  # separate tensors: a copy
        weights = [getattr(e, kind).weight for e in packed]
        stacked = E.stack_weights(weights)
        assert stacked.data_ptr() == weights[0].data_ptr() and torch.equal(stacked, torch.stack(separate))
    grads = {n: p.grad for n, p in models[0].named_parameters()}
    for name, p in models[1].named_parameters():
        assert torch.equal(p.main_grad, grads[name].float()), name
