"""One paragraph on why the top-ranked layout wins, against the best layout with each dimension smaller or larger."""

from __future__ import annotations

from mzoo.plan.constants import GIB
from mzoo.plan.search import Plan, rank_key
from mzoo.plan.steptime import StepTime


def explain(plans: list[Plan]) -> str:
    """One paragraph on the top layout: what it costs, and for tp, pp, ep and cp what the fastest layout
    with a smaller / larger value (the first such row of these plans) would lose: it does not fit, or
    it is slower, and because of what."""
    if not plans:
        return "no valid layout."
    best = plans[0]
    if not best.feasible:
        return (f"No layout fits: the smallest, {best.layout.label()}, {best.verdict()[len('does not fit: '):]} "
                "Add GPUs, use --recompute full, shorter sequences, or a GPU with more memory.")
    lay, mem, tm = best.layout, best.memory, best.time
    text = [f"{lay.label()} is the fastest layout that fits: {mem.total / GIB:.1f} of {best.usable_gib:.1f} GiB "
            f"on its busiest GPU (stage {mem.stage}), {seconds(tm.step)} per step, MFU {tm.mfu:.1%}, pipeline bubble "
            f"{tm.bubble:.1%}."]
    others = [p for p in plans if p is not best and p.valid]
    dims = ("tp", "pp", "ep", "cp") if any(p.layout.ep > 1 for p in plans) else ("tp", "pp", "cp")

    for dim in dims:
        own = getattr(lay, dim)
        for pick in ([p for p in others if getattr(p.layout, dim) < own],
                     [p for p in others if getattr(p.layout, dim) > own]):
            if not pick:
                continue
            alt = min(pick, key=rank_key)  # the fastest such layout: the one a table of these plans shows first
            head = f"With {dim}={getattr(alt.layout, dim)} the best is {alt.layout.label()}"
            if not alt.fits:
                part = alt.memory.largest().replace("_", " ")
                text.append(f"{head}, which does not fit ({alt.memory.total / GIB:.0f} GiB; largest part: {part}).")
                continue
            slower = alt.time.step / tm.step - 1
            if slower < 0.005:
                more = "more" if alt.memory.total > mem.total else "less"
                text.append(f"{head}, as fast (within 0.5%) with {more} memory ({alt.memory.total / GIB:.0f} GiB).")
            else:
                text.append(f"{head}, {_slower(alt.time.step / tm.step)} ({_main_difference(tm, alt.time)}).")
    return " ".join(text)


def seconds(x: float) -> str:
    """1.23 s, 45.6 ms, 78 µs."""
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} µs"


def _slower(ratio: float) -> str:
    return f"{ratio:.1f}x slower" if ratio >= 2 else f"{ratio - 1:.0%} slower"


def _main_difference(best: StepTime, alt: StepTime) -> str:
    a, b = alt.parts(), best.parts()
    name, delta = max(((k, a[k] - b.get(k, 0.0)) for k in a), key=lambda kv: kv[1])
    label = {"compute": "more compute on the slowest GPU", "tp_comm": "more TP communication",
             "ep_comm": "more expert all-to-all traffic", "cp_comm": "exposed ring-attention traffic",
             "pp_comm": "more pipeline p2p", "dp_comm": "exposed gradient synchronisation",
             "optimizer": "a larger optimizer step", "bubble": "a larger pipeline bubble"}[name]
    return f"{label}: +{seconds(delta)}"
