"""Check: does transformers 4.5x load what mzoo writes to the same logits as transformers 5?

mzoo writes config.json in both spellings (converters/config_map.py: `rope_parameters` for 5, top-level
`rope_theta` + `rope_scaling` for 4.x; `dtype` and `torch_dtype`; NemotronH's `hybrid_override_pattern`
next to `layers_block_type`). tests/converters/test_config_spellings.py checks that transformers 5 reads
such a file unchanged; this script checks the other side, which needs a second environment:

    python3.11 -m venv /tmp/tf457
    /tmp/tf457/bin/pip install torch==2.13.0              # first: the CPU wheel, so nothing pulls CUDA
    /tmp/tf457/bin/pip install "transformers==4.57.*" safetensors
    .venv/bin/python benchmarks/tf4.py --tf4-python /tmp/tf457/bin/python [--work DIR]

In this environment (transformers 5) it makes, per row, a tiny random model with transformers' own
classes (norms, biases, routers and DeepSeek's score-correction bias perturbed so that each matters),
saves it with save_pretrained, converts it with mzoo (HF -> canonical -> HF, tensor by tensor), and
keeps transformers 5's logits on a fixed batch (2 x 48 tokens) from the source folder; rows named
after a zoo preset are `mzoo init` folders instead. Then it runs itself under --tf4-python, which
loads every mzoo folder with 4.5x and prints max |logits - transformers 5's source logits| for both
versions, with what 4.5x read as rope_theta / rope_scaling and any warning it logged.

Rows that differ for reasons config.json cannot express (4.57's own model code, fixed in 5) are
expected and named in docs/benchmarks.md ("transformers 4.5x"). fp32 on the CPU, ~2 min.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
BATCH = (2, 48)
PRESETS = ("llama-tiny", "gpt-tiny", "mixtral-tiny", "deepseek-tiny", "mamba-tiny", "mamba1-tiny",
           "mamba-hybrid-tiny")


def _rows() -> dict:
    """name -> a transformers 5 config (imported here: the check half runs under transformers 4)."""
    from transformers import (DeepseekV2Config, DeepseekV3Config, GPT2Config, LlamaConfig, Mamba2Config,
                              MambaConfig, MixtralConfig, NemotronHConfig)

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32.0, "beta_slow": 1.0}
    mscaled = {"mscale": 1.0, "mscale_all_dim": 1.0}
    mla = dict(vocab_size=160, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
               num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
               qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=128)
    v3 = dict(mla, q_lora_rank=16, n_shared_experts=1, topk_group=1)
    v2 = dict(mla, q_lora_rank=None, n_shared_experts=2, topk_method="greedy")
    llama = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256)
    mixtral = dict(vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                   max_position_embeddings=128)
    mamba2 = dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                  chunk_size=16)
    hybrid = dict(vocab_size=160, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=48, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                  chunk_size=8,
                  layers_block_type=["linear_attention", "full_attention", "mlp", "linear_attention"])

    def plain(theta: float, **more: float) -> dict:
        return {"rope_type": "default", "rope_theta": theta, **more}

    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    linear = {"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}
    return {
        "llama3-scaled": LlamaConfig(**llama, rope_parameters=llama3),
        "llama-linear-bias": LlamaConfig(**llama, attention_bias=True, mlp_bias=True, rope_parameters=linear),
        "llama-partial-rope": LlamaConfig(**llama, rope_parameters=plain(30000.0, partial_rotary_factor=0.5)),
        "gpt2": GPT2Config(vocab_size=1001, n_embd=64, n_head=4, n_layer=2, n_positions=64),
        "mixtral": MixtralConfig(**mixtral),
        "mixtral-theta-5e4": MixtralConfig(**mixtral, rope_parameters=plain(50000.0)),
        "deepseek_v3-yarn": DeepseekV3Config(**v3, n_group=1, rope_parameters={**yarn, **mscaled}),
        "deepseek_v3-yarn-groups": DeepseekV3Config(**v3, n_group=2, rope_parameters={**yarn, **mscaled}),
        "deepseek_v2-yarn": DeepseekV2Config(**v2, rope_parameters=yarn),
        "deepseek_v2-yarn-mscale": DeepseekV2Config(**v2, rope_parameters={**yarn, "mscale": 0.707,
                                                                            "mscale_all_dim": 0.707}),
        "mamba": MambaConfig(vocab_size=160, hidden_size=32, num_hidden_layers=2, state_size=8,
                             time_step_rank=3, use_bias=True, use_conv_bias=False),
        "mamba2-1group": Mamba2Config(**mamba2, n_groups=1),
        "mamba2-2groups": Mamba2Config(**mamba2, n_groups=2),
        "nemotron_h": NemotronHConfig(**hybrid),
    }


def _save_random(config, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms at 1 and biases at 0 would hide a mistake
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):  # routers that choose clearly
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.save_pretrained(path)


def _logits(path: Path, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, BATCH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, model(ids).logits


def make(work: Path) -> None:
    """transformers 5 half: the folders and the reference logits."""
    import transformers

    from mzoo.converters.hf import read_config, save_hf
    from mzoo.models.canonical import canonical_tensors, random_canonical
    from mzoo.zoo import get

    transformers.utils.logging.disable_progress_bar()
    for name, config in _rows().items():
        (work / name).mkdir()
        _save_random(config, work / name / "src")
        reader, adapter, cfg = read_config(work / name / "src")
        tensors = ((t.name, adapter.to_canonical(t.name, reader.get, cfg)) for t in canonical_tensors(cfg))
        save_hf(cfg, tensors, work / name / "mzoo")
        ids, ref = _logits(work / name / "src", config.vocab_size)
        torch.save({"ids": ids, "ref": ref, "tf5": _logits(work / name / "mzoo", config.vocab_size)[1]},
                   work / name / "logits.pt")
    for name in PRESETS:
        cfg = get(name).config
        (work / name).mkdir()
        save_hf(cfg, random_canonical(cfg, seed=3), work / name / "mzoo")
        ids, ref = _logits(work / name / "mzoo", cfg.vocab_size)
        torch.save({"ids": ids, "ref": ref, "tf5": ref}, work / name / "logits.pt")


def check(work: Path) -> None:
    """transformers 4.5x half: load each mzoo folder, compare, print one line per row."""
    import transformers
    from transformers import AutoModelForCausalLM

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "fast path is not available" not in record.getMessage():  # Mamba without its CUDA kernels
                seen.append(record.getMessage()[:150])

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_default_handler()  # warnings print once each, under their row
    transformers.utils.logging.get_logger().addHandler(Keep())
    tf4 = f"tf {transformers.__version__} max|d|"
    print(f"{'row':26s} {'tf 5 max|d|':>12s} {tf4:>18s}  rope_theta / rope_scaling as read")
    for folder in sorted(p for p in work.iterdir() if (p / "logits.pt").exists()):
        saved, seen[:] = torch.load(folder / "logits.pt"), []
        tf5 = (saved["tf5"] - saved["ref"]).abs().max().item()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = AutoModelForCausalLM.from_pretrained(folder / "mzoo", dtype=torch.float32).eval()
                with torch.no_grad():
                    tf4 = f"{(model(saved['ids']).logits - saved['ref']).abs().max().item():.2e}"
            config = model.config
            rope = f"{getattr(config, 'rope_theta', None)} / {getattr(config, 'rope_scaling', None)}"
        except Exception as e:  # noqa: BLE001 - a row 4.5x cannot load is a result, not a crash
            tf4, rope = "fails", f"{type(e).__name__}: {str(e)[:110]}"
        print(f"{folder.name:26s} {tf5:12.2e} {tf4:>18s}  {rope}")
        for message in dict.fromkeys(seen):
            print(f"{'':26s} warning: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tf4-python", help="python of a transformers 4.5x environment (see the docstring)")
    parser.add_argument("--work", type=Path, help="new or empty folder for the models (default: a temp one)")
    parser.add_argument("--check", type=Path, help=argparse.SUPPRESS)  # the 4.5x half, run by the first
    args = parser.parse_args()
    if args.check:
        return check(args.check)
    if not args.tf4_python or not Path(args.tf4_python).exists():
        parser.error("--tf4-python must name the python of a transformers 4.5x environment (see --help)")
    if args.work and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty; give a new or empty folder")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        make(work)
        subprocess.run([args.tf4_python, __file__, "--check", str(work)], check=True, cwd="/")


if __name__ == "__main__":
    main()
