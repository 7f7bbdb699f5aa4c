"""Expert parallelism in the engine: EP / EDP process groups equal Megatron-Core's, the differentiable
all-to-all equals a single-process exchange, and a tiny mixture of experts trained with EP on real gloo
ranks gets the same gradients, grad norms and weights as one process that holds every expert and sees
every token (dense params averaged over DP, expert params summed over EDP and divided by dp)."""

from __future__ import annotations

import io

import dist as D
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mzoo.config import ConfigError
from mzoo.layout import Layout
from mzoo.parallel import collectives as C
from mzoo.parallel.optimizer import AdamWConfig, Optimizer
from mzoo.parallel.state import ParallelState, expert_group_ranks


def _pack(value) -> bytes:
    """Tensors as bytes: a rank's tensors would otherwise travel by file descriptor and can vanish
    with the rank before the parent reads them."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _run(fn, world: int, *args) -> list:
    return [torch.load(io.BytesIO(b)) for b in D.run(fn, world, *args)]


# ---- process groups against Megatron-Core's RankGenerator ---------------------------------------
def _mzoo_groups(config: Layout) -> dict[str, list[list[int]]]:
    """Every group of every axis, from the coordinates for_rank computes (no process groups)."""
    states = [ParallelState.for_rank(config, r) for r in range(config.world_size)]
    axes = ("tp", "cp", "dp", "pp", "ep", "edp")

    def coord(s: ParallelState) -> dict[str, int]:
        return {a: getattr(s, f"{a}_rank") for a in axes}

    # members of an axis group share every coordinate except that axis (and ep/edp re-read dp x cp)
    fixed = {"tp": ("cp", "dp", "pp"), "cp": ("tp", "dp", "pp"), "dp": ("tp", "cp", "pp"), "pp": ("tp", "cp", "dp"),
             "ep": ("tp", "pp", "edp"), "edp": ("tp", "pp", "ep")}
    out = {}
    for axis, keep in fixed.items():
        groups: dict[tuple, list[int]] = {}
        for s in states:
            groups.setdefault(tuple(coord(s)[k] for k in keep), []).append(s.rank)
        out[axis] = sorted(groups.values())
    return out


LAYOUTS = [  # world, tp, pp, cp, ep
    (8, 1, 1, 1, 1), (8, 1, 1, 1, 2), (8, 1, 1, 1, 4), (8, 1, 1, 1, 8), (8, 2, 1, 1, 2), (8, 2, 1, 1, 4),
    (8, 1, 2, 1, 2), (8, 1, 2, 1, 4), (8, 2, 2, 1, 2), (16, 2, 2, 1, 2), (16, 2, 2, 1, 4), (16, 1, 2, 1, 4),
    (16, 2, 1, 1, 8), (16, 1, 1, 2, 4), (16, 2, 1, 2, 2), (16, 1, 2, 2, 4), (16, 2, 2, 2, 4),
]


@pytest.mark.parametrize("world, tp, pp, cp, ep", LAYOUTS)
def test_groups_match_megatron_rank_generator(world, tp, pp, cp, ep):
    ps = pytest.importorskip("megatron.core.parallel_state")
    dp = world // (tp * pp * cp)
    config = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep)
    order = "tp-cp-ep-dp-pp"  # Megatron-Core's default; the expert generator has cp 1 and dp = edp
    dense = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
    expert = ps.RankGenerator(tp=tp, ep=ep, dp=world // (tp * ep * pp), pp=pp, cp=1, order=order)
    want = {"tp": dense.get_ranks("tp"), "cp": dense.get_ranks("cp"), "dp": dense.get_ranks("dp"),
            "pp": dense.get_ranks("pp"), "ep": expert.get_ranks("ep"), "edp": expert.get_ranks("dp")}
    assert expert.get_ranks("tp") == want["tp"] and expert.get_ranks("pp") == want["pp"]  # expert TP = TP
    got = _mzoo_groups(config)
    for axis, ranks in want.items():
        assert got[axis] == sorted(ranks), axis
    made = expert_group_ranks(config, world)  # what build() creates, in its order
    assert sorted(r for a, r in made if a == "ep") == sorted(want["ep"])
    assert sorted(r for a, r in made if a == "edp") == sorted(want["edp"])
    assert config.expert_dp == world // (tp * ep * pp)


def test_ep_must_divide_data_parallel_ranks():
    with pytest.raises(ConfigError, match="expert parallel size 3"):
        ParallelState.for_rank(Layout(dp=4, ep=3), 0)
    state = ParallelState.for_rank(Layout(dp=4, ep=2), 3)
    assert (state.ep, state.expert_dp, state.ep_rank, state.edp_rank) == (2, 2, 1, 1)


# ---- differentiable all-to-all ------------------------------------------------------------------
FEATURES = (2, 3)


def _splits(world: int, seed: int) -> torch.Tensor:
    """splits[r, j]: rows rank r sends to rank j; zeros included, and rank 1 sends nothing at all."""
    s = torch.randint(0, 4, (world, world), generator=torch.Generator().manual_seed(seed))
    s[1] = 0
    return s


def _inputs(world: int, seed: int) -> list[torch.Tensor]:
    s = _splits(world, seed)
    return [torch.randn(int(s[r].sum()), *FEATURES, generator=torch.Generator().manual_seed(seed * 100 + r))
            for r in range(world)]


def _weights(world: int, seed: int) -> list[torch.Tensor]:
    """Per-rank output weights of the test loss sum(out_j * w_j): its gradient is w_j, routed back."""
    s = _splits(world, seed)
    return [torch.randn(int(s[:, j].sum()), *FEATURES, generator=torch.Generator().manual_seed(seed * 100 + 50 + j))
            for j in range(world)]


def _exchange(state: ParallelState, size: int) -> tuple:
    """One all-to-all over this rank's EP group of `size` ranks, each group with its own data."""
    seed, rank = 10 * size + state.edp_rank, state.ep_rank
    s = _splits(size, seed)
    x = _inputs(size, seed)[rank].requires_grad_(True)
    recv = C.exchange_counts(s[rank].clone(), state.ep_group)
    out = C.all_to_all(x, recv.tolist(), s[rank].tolist(), state.ep_group)
    (out * _weights(size, seed)[rank]).sum().backward()
    return seed, rank, recv, out.detach(), x.grad


@pytest.mark.dist
@pytest.mark.parametrize("size", [2, 4])
def test_all_to_all_matches_single_process_exchange(ranks, size):
    for seed, rank, recv, out, grad in (r["a2a"][size] for r in ranks):
        s, xs, ws = _splits(size, seed), _inputs(size, seed), _weights(size, seed)
        blocks = [list(x.split(s[r].tolist())) for r, x in enumerate(xs)]  # blocks[r][j]: rank r -> rank j
        assert recv.tolist() == s[:, rank].tolist()
        assert torch.equal(out, torch.cat([blocks[r][rank] for r in range(size)]))
        # d loss / d x_rank: block j is the slice of w_j that rank j received from us
        want = [ws[j].split(s[:, j].tolist())[rank] for j in range(size)]
        assert grad.shape == xs[rank].shape and torch.equal(grad, torch.cat(want))


def test_all_to_all_is_the_identity_without_a_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert C.all_to_all(x, [3], [3], None) is x
    counts = torch.tensor([3])
    assert C.exchange_counts(counts, None) is counts


# ---- optimizer: a tiny mixture of experts, EP on 4 ranks vs one process --------------------------
H, E, T, STEPS = 6, 4, 5, 3  # hidden, global experts, tokens per DP rank, optimizer steps
OPT = dict(lr=2e-2, weight_decay=0.1, clip_grad=5.5)


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w_in": torch.randn(H, H, generator=g) * 0.5, "bias": torch.randn(H, generator=g) * 0.1,
            "experts": torch.randn(E, H, H, generator=g) * 0.5, "c": torch.randn(H, generator=g)}


def _batch(step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [dp, T, H] and their experts [dp, T] of one global batch; expert 3 unused at step 0."""
    g = torch.Generator().manual_seed(100 + step)
    x, experts = torch.randn(dp, T, H, generator=g), torch.randint(0, E, (dp, T), generator=g)
    if step == 0:
        experts[experts == 3] = 0
    return x, experts


class TinyMoE(nn.Module):
    """Dense input projection, top-1 routed experts exchanged by all-to-all, dense output weights."""

    def __init__(self, state: ParallelState):
        super().__init__()
        init, self.state, self.local = _initial(), state, E // state.ep
        # submodules, so that model.parameters() interleaves dense and expert params (dicts sort keys)
        self.pre = nn.ParameterDict({"w_in": nn.Parameter(init["w_in"].clone()),
                                     "bias": nn.Parameter(init["bias"].clone())})
        first = state.ep_rank * self.local  # Megatron numbering: ep_rank * E/EP + local index
        self.experts = nn.ParameterList(nn.Parameter(init["experts"][first + i].clone()) for i in range(self.local))
        for p in self.experts:
            p.expert_parallel = True
        self.post = nn.ParameterDict({"frozen": nn.Parameter(torch.ones(H), requires_grad=False),  # like expert_bias
                                      "c": nn.Parameter(init["c"].clone())})

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        group, ep, local = self.state.ep_group, self.state.ep, self.local
        h = x @ self.pre["w_in"].T + self.pre["bias"]
        order = torch.argsort(expert, stable=True)  # grouped by global expert = by EP rank, local expert
        counts = torch.bincount(expert, minlength=E)
        recv = C.exchange_counts(counts, group).view(ep, local)  # [source rank, local expert]
        send_splits, recv_splits = counts.view(ep, local).sum(1).tolist(), recv.sum(1).tolist()
        rows = C.all_to_all(h[order], recv_splits, send_splits, group)
        which = torch.repeat_interleave(torch.arange(local).repeat(ep), recv.reshape(-1))
        out = torch.zeros_like(rows)
        for i, w in enumerate(self.experts):
            idx = (which == i).nonzero().flatten()
            out = out.index_copy(0, idx, torch.tanh(rows[idx] @ w.T))
        back = C.all_to_all(out, send_splits, recv_splits, group)
        y = torch.zeros_like(back).index_copy(0, order, back) * self.post["frozen"]
        return ((y * self.post["c"]) ** 2).sum(1).mean()


def _reference() -> list[dict]:
    """One process, every expert, every token; loss = mean over all tokens; torch's AdamW + clipping."""
    p = {k: nn.Parameter(v.clone()) for k, v in _initial().items()}
    opt = torch.optim.AdamW([{"params": [p["w_in"], p["experts"]], "weight_decay": OPT["weight_decay"]},
                             {"params": [p["bias"], p["c"]], "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=(0.9, 0.95), eps=1e-8)
    out = []
    for step in range(STEPS):
        x, experts = _batch(step, 4)
        x, experts = x.reshape(-1, H), experts.reshape(-1)
        h = x @ p["w_in"].T + p["bias"]
        y = torch.tanh(torch.einsum("nij,nj->ni", p["experts"][experts], h))
        loss = ((y * p["c"]) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        grads = {k: v.grad.clone() for k, v in p.items()}
        norm = float(torch.nn.utils.clip_grad_norm_(list(p.values()), OPT["clip_grad"]))
        opt.step()
        out.append({"norm": norm, "grads": grads, "params": {k: v.detach().clone() for k, v in p.items()},
                    "exp_avg": {k: opt.state[v]["exp_avg"].clone() for k, v in p.items()}})
    return out


def _train(rank: int, world: int, ep: int) -> dict:
    state = ParallelState.build(Layout(dp=world, ep=ep))
    ranks = {a: dist.get_process_group_ranks(g) if g is not None else [rank]
             for a, g in (("ep", state.ep_group), ("edp", state.edp_group))}
    result = {"ep_rank": state.ep_rank, "groups": ranks, "edp_is_dp": state.edp_group is state.dp_group, "runs": {}}
    for distributed in (False, True):
        model = TinyMoE(state)
        opt = Optimizer(model, state, AdamWConfig(**OPT, distributed=distributed))
        steps = []
        for step in range(STEPS):
            x, experts = _batch(step, world)
            opt.zero_grad()
            model(x[rank], experts[rank]).backward()
            grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            norm = opt.step(OPT["lr"])
            steps.append({"norm": norm, "grads": grads,
                          "params": {n: p.detach().clone() for n, p in model.named_parameters()}})
        states = opt.param_states()
        again = Optimizer(model, state, AdamWConfig(**OPT, distributed=distributed))
        again.load_param_states(states, opt.step_count)
        reloaded = again.param_states()
        roundtrip = all(torch.equal(a, b) for k in states for a, b in zip(states[k], reloaded[k]))
        result["runs"][distributed] = {"steps": steps, "states": states, "roundtrip": roundtrip,
                                       "frozen_grad": model.post["frozen"].grad,
                                       "order": [n for n, p in model.named_parameters() if p.requires_grad]}
    return result


def _worker(rank, world):
    """Everything that needs ranks, in one spawn: starting 4 processes takes seconds."""
    a2a = {size: _exchange(ParallelState.build(Layout(dp=world, ep=size)), size) for size in (2, 4)}
    return _pack({"a2a": a2a, "train": {ep: _train(rank, world, ep) for ep in (1, 2, 4)}})


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Results of 4 gloo ranks: all-to-all over EP groups of 2 and 4, and training with EP 1, 2, 4."""
    return _run(_worker, 4)


def _expert_names(ep_rank: int, ep: int) -> dict[str, int]:
    """Local parameter name -> global expert index on EP rank `ep_rank`."""
    local = E // ep
    return {f"experts.{i}": ep_rank * local + i for i in range(local)}


@pytest.fixture(scope="module")
def reference():
    return _reference()


def test_reference_clips_and_uses_every_expert(reference):
    norms = [s["norm"] for s in reference]
    assert any(n > OPT["clip_grad"] for n in norms) and any(n < OPT["clip_grad"] for n in norms), norms
    assert torch.all(reference[0]["grads"]["experts"][3] == 0) and reference[1]["grads"]["experts"][3].abs().sum() > 0


@pytest.mark.dist
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_parallel_training_matches_single_process(ranks, reference, ep):
    world = 4
    results = [r["train"][ep] for r in ranks]
    for rank, res in enumerate(results):
        assert res["ep_rank"] == rank % ep
        assert res["groups"]["ep"] == [r for r in range(world) if r // ep == rank // ep]
        assert res["groups"]["edp"] == [r for r in range(world) if r % ep == rank % ep]
        assert res["edp_is_dp"] == (ep == 1)  # the same rank set reuses the DP group
    dense = {"pre.w_in": "w_in", "pre.bias": "bias", "post.c": "c"}  # local -> reference name
    for distributed in (False, True):
        for step, ref in enumerate(reference):
            runs = [res["runs"][distributed]["steps"][step] for res in results]
            # what each rank's backward produced, combined as the definition says: the mean over all
            # data-parallel ranks of d(local mean loss); an expert's grads live only on its EP ranks
            for name, ref_name in dense.items():
                mean = torch.stack([r["grads"][name] for r in runs]).mean(0)
                torch.testing.assert_close(mean, ref["grads"][ref_name], rtol=0, atol=1e-6)
            for res, run in zip(results, runs):
                assert abs(run["norm"] - ref["norm"]) <= 1e-6 * max(1.0, ref["norm"]), (run["norm"], ref["norm"])
                for name, ref_name in dense.items():
                    torch.testing.assert_close(run["params"][name], ref["params"][ref_name], rtol=0, atol=1e-6)
                for name, e in _expert_names(res["ep_rank"], ep).items():
                    same = [r["grads"][name] for q, r in zip(results, runs) if q["ep_rank"] == res["ep_rank"]]
                    torch.testing.assert_close(torch.stack(same).sum(0) / world, ref["grads"]["experts"][e],
                                               rtol=0, atol=1e-6)
                    torch.testing.assert_close(run["params"][name], ref["params"]["experts"][e], rtol=0, atol=1e-6)
                assert torch.equal(run["params"]["post.frozen"], torch.ones(H))
        for res in results:
            run = res["runs"][distributed]
            assert run["roundtrip"] and run["frozen_grad"] is None
            # param_states: model.parameters() order of the trainable params, dense and expert mixed
            names = ["pre.bias", "pre.w_in", *(f"experts.{i}" for i in range(E // ep)), "post.c"]
            assert run["order"] == names
            experts = _expert_names(res["ep_rank"], ep)
            for kind in ("fp32_param", "exp_avg"):
                assert len(run["states"][kind]) == len(names)
                for name, value in zip(names, run["states"][kind]):
                    if kind == "fp32_param":
                        want = run["steps"][-1]["params"][name]
                    elif name in experts:
                        want = reference[-1]["exp_avg"]["experts"][experts[name]]
                    else:
                        want = reference[-1]["exp_avg"][dense[name]]
                    torch.testing.assert_close(value, want, rtol=0, atol=1e-6)


def test_optimizer_rejects_expert_params_when_ep_exceeds_data_parallel():
    model = TinyMoE(ParallelState.single(Layout(ep=2)))  # meta-model style state: ep 2, one process
    with pytest.raises(ConfigError, match="expert parallel size 2 must divide"):
        Optimizer(model, ParallelState.single(Layout(ep=2)), AdamWConfig())
