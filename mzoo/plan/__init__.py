"""Parallel-layout planner: which (tp, pp, vpp, ep, cp, dp) to train a model with on N GPUs.

A first-principles model; every formula and constant is in docs/plan.md with the reason for it.

- `hardware`: the GPU table (planning and the trainer's MFU peak), `constants`: the model's constants;
- `profile`: how a framework stores things (Megatron-Core on GPUs, or mzoo's own engine);
- `layout`, `settings`: a parallel layout and what a run asks of it;
- `costs`: the one cost model, per-block parameters, saved activations and FLOPs, per rank and global;
- `memory`: bytes per GPU; `steptime`: seconds per step;
- `search`: validity, evaluation and ranking of layouts; `explain`: why the best one wins.
"""
