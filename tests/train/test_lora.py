"""LoRA against the real peft package: an adapter mzoo trains loads with PeftModel.from_pretrained to
mzoo's logits (also when trained at TP2 and PP2), an adapter peft makes loads into mzoo to peft's
logits, a merge equals peft's merge_and_unload(), TP2 and PP2 give the one-process loss curve, and
only the adapters reach the optimizer (memory counted exactly, and as the planner counts it)."""

from __future__ import annotations

import json
from pathlib import Path

import dist as D
import pytest
import torch

# light imports only at the top: the distributed workers import this module (peft and transformers
# take 5-15 s to import on a loaded machine), so those are imported where they are used
from mzoo.data import sft
from mzoo.layout import Layout
from mzoo.models import build_chunks, build_model
from mzoo.models.canonical import load_canonical
from mzoo.models.lora import adapter_parameters, add_lora, load_adapters
from mzoo.parallel.lora import LoRAConfig
from mzoo.parallel.state import ParallelState
from mzoo.train.run import gather_canonical
from mzoo.train.trainer import TrainConfig, Trainer

LORA = LoRAConfig(rank=4, alpha=8.0)
IDS = torch.tensor([[5, 9, 17, 33, 2, 70, 41, 8, 99, 12], [3, 3, 60, 21, 7, 88, 14, 50, 6, 1]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import make_hf_model
    from test_sft import _task, make_tokenizer, write_jsonl
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("lora")
    make_tokenizer(root)
    make_hf_model(root / "model", LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64))
    write_jsonl(root / "train.jsonl", _task(32, 0))
    return root


@pytest.fixture(scope="module")
def base(folder):
    """(config, canonical base tensors, packed training samples): what every layout trains from."""
    from transformers import AutoTokenizer

    from mzoo.converters.hf import read_config

    reader, adapter, cfg = read_config(folder / "model")
    tensors = {t.name: adapter.to_canonical(t.name, reader.get, cfg) for t in _canonical(cfg)}
    train, _, _ = sft.build(sft.SFTConfig(folder / "train.jsonl", "prompt-completion"),
                            AutoTokenizer.from_pretrained(folder), 32, 128, 0)
    return cfg, tensors, list(train)


def _canonical(cfg):
    from mzoo.models.canonical import canonical_tensors

    return canonical_tensors(cfg)


def _model(base, state: ParallelState, lora: LoRAConfig = LORA, b_std: float = 0.02):
    """This rank's chunks of the HF base, frozen, with adapters (B non-zero so a dropped B fails)."""
    cfg, tensors, _ = base
    model = build_chunks(cfg, state, dtype=torch.float32)
    load_canonical(model, tensors.__getitem__)
    add_lora(model, cfg, lora, seed=3, b_std=b_std)
    return model


def _mzoo_logits(base, tensors: dict, lora: LoRAConfig = LORA) -> torch.Tensor:
    model = _model(base, ParallelState.single(), lora)
    load_adapters(model, tensors)
    with torch.no_grad():
        return model[0].eval()(IDS)


def _peft_logits(folder: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(IDS).logits


def _train(base, state: ParallelState, steps: int = 4, lora: LoRAConfig = LORA, **engine):
    """A few LoRA steps on the SFT task: (losses and grad norms, the adapter's canonical tensors, sizes)."""
    model = _model(base, state, lora)
    train = base[2]
    tcfg = TrainConfig(seq_len=32, micro_batch=2, global_batch=4, steps=steps, lr=3e-3, min_lr=3e-4, warmup=1,
                       weight_decay=0.0, **engine)
    trainer = Trainer(model, model.cfg, state, tcfg, sft.sampler(train, 0))
    logs = trainer.train()
    losses = [log.loss for log in logs] + [log.grad_norm for log in logs]  # the norm counts each tensor once
    opt = trainer.optimizer
    sizes = {"optimizer_params": sum(p.numel() for p in opt.params),
             "adapter_params": sum(p.numel() for _, p in adapter_parameters(model)),
             "main_grad": sum(g.main_grad.numel() for g, _ in opt.groups),
             "with_grad": sum(p.numel() for p in model.parameters() if p.requires_grad),
             # fp32 master weights + Adam moments, this rank's slices: 12 bytes an adapter element (/ dp)
             "optimizer_bytes": sum(4 * (g.master.numel() + g.exp_avg.numel() + g.exp_avg_sq.numel())
                                    for g, _ in opt.groups),
             "base_with_state": sum(1 for p in model.parameters()
                                    if not p.requires_grad and (p.grad is not None or hasattr(p, "main_grad")))}
    return losses, gather_canonical(model, state, trainable=True), sizes


LORA_ATTENTION = LoRAConfig(rank=4, alpha=8.0, parts=("q", "k", "v", "proj"))


@pytest.fixture(scope="module")
def moe_base(base, tmp_path_factory):
    """A Mixtral base (its MLPs are routed experts: adapters on attention only) on the same samples."""
    from conftest import make_moe_model
    from transformers import MixtralConfig

    from mzoo.converters.hf import read_config

    path = make_moe_model(tmp_path_factory.mktemp("mixtral") / "mx", MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    reader, adapter, cfg = read_config(path)
    return cfg, {t.name: adapter.to_canonical(t.name, reader.get, cfg) for t in _canonical(cfg)}, base[2]


@pytest.fixture(scope="module")
def reference(base):
    torch.set_num_threads(1)
    return _train(base, ParallelState.single())


def test_mzoo_adapter_loads_in_peft_with_the_same_logits_and_merges_as_peft(folder, base, reference, tmp_path):
    from conftest import all_safetensors
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from mzoo.cli.main import app
    from mzoo.converters.peft import save_adapter

    _, tensors, sizes = reference
    assert sizes["optimizer_params"] == sizes["adapter_params"] == sizes["with_grad"] == sizes["main_grad"]
    assert sizes["optimizer_bytes"] == 12 * sizes["adapter_params"] and sizes["base_with_state"] == 0
    out = save_adapter(base[0], LORA, tensors, tmp_path / "adapter", str(folder / "model"))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    ours, theirs = _mzoo_logits(base, tensors), _peft_logits(folder, out)
    assert (ours - theirs).abs().max() <= 1e-4
    plain = _mzoo_logits(base, {n: torch.zeros_like(t) if "linear_out" in n else t for n, t in tensors.items()})
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters
    # --merge: W + scaling B A fused per projection equals peft's merge_and_unload()
    merged_hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "model"), out).merge_and_unload()
    result = CliRunner().invoke(app, ["convert", "hf->hf", str(folder / "model"), str(tmp_path / "merged"),
                                      "--merge", str(out)])
    assert result.exit_code == 0, result.output
    mine = all_safetensors(tmp_path / "merged")
    for name, value in merged_hf.state_dict().items():
        assert (mine[name] - value).abs().max() <= 1e-6, name
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(IDS).logits
    assert (logits - theirs).abs().max() <= 1e-4


def test_peft_made_adapter_loads_into_mzoo_with_peft_logits(folder, base, tmp_path):
    """peft's default llama targets (q and v; here down_proj too) and its random B (init_lora_weights
    False): mzoo's adapter takes it as it is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mzoo.converters.peft import read_adapter

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    made = get_peft_model(hf, LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    made.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = made.eval()(IDS).logits
    lora, tensors = read_adapter(tmp_path / "theirs", base[0])
    assert (lora.rank, lora.alpha, lora.parts) == (2, 5.0, ("fc2", "q", "v"))
    assert (_mzoo_logits(base, tensors, lora) - theirs).abs().max() <= 1e-4


LAYOUTS = {"tp2-sp": (dict(tp=2, sequence_parallel=True), {}), "pp2": (dict(pp=2), {}),
           "dp2-distributed-overlap": (dict(dp=2), dict(distributed_optimizer=True, overlap_grad_reduce=True,
                                                        overlap_param_gather=True))}


def _layouts_worker(rank, world, base, moe_base):
    out = {name: _train(base, ParallelState.build(Layout(**layout)), **engine)
           for name, (layout, engine) in LAYOUTS.items()}
    out["mixtral-ep2"] = _train(moe_base, ParallelState.build(Layout(dp=2, ep=2)), lora=LORA_ATTENTION,
                                distributed_optimizer=True)
    return out


@pytest.mark.dist
def test_tp2_pp2_dp2_ep2_match_one_process_and_save_what_peft_loads(folder, base, moe_base, reference, tmp_path):
    """The done-when: a LoRA finetune at TP2 (with sequence parallelism), at PP2 and at DP2 with the
    distributed optimizer and both overlaps gives the one-process losses and gradient norms within
    1e-5 and saves an adapter that peft loads to mzoo's logits; Mixtral's attention adapters at EP2
    give its one-process curve. One launch runs the four layouts."""
    from mzoo.converters.peft import save_adapter

    results = D.run(_layouts_worker, 2, base, moe_base)[0]
    moe_losses, moe_tensors, _ = results.pop("mixtral-ep2")
    moe_ref = _train(moe_base, ParallelState.single(), lora=LORA_ATTENTION)
    assert max(abs(a - b) for a, b in zip(moe_losses, moe_ref[0])) <= 1e-5, (moe_losses, moe_ref[0])
    assert all((moe_tensors[k] - v).abs().max() <= 1e-5 for k, v in moe_ref[1].items())
    for name, (losses, tensors, sizes) in results.items():
        assert max(abs(a - b) for a, b in zip(losses, reference[0])) <= 1e-5, (name, losses, reference[0])
        assert sizes["optimizer_params"] == sizes["adapter_params"] <= reference[2]["adapter_params"]
        assert sizes["main_grad"] <= sizes["adapter_params"] + 2  # (bucket padding): nothing for the base
        assert sizes["base_with_state"] == 0 and sizes["optimizer_bytes"] <= 12 * (sizes["main_grad"])
        assert set(tensors) == set(reference[1])
        for key, value in reference[1].items():
            assert (tensors[key] - value).abs().max() <= 1e-5, (name, key)
        out = save_adapter(base[0], LORA, tensors, tmp_path / name)
        assert (_mzoo_logits(base, tensors) - _peft_logits(folder, out)).abs().max() <= 1e-4, name


def test_planner_counts_the_adapters_exactly(base):
    """The planner's adapter elements per TP rank equal the engine's, and a LoRA run's optimizer,
    gradient and weight bytes are the base in its dtype plus the adapters' state."""
    from mzoo.plan.costs import as_model, lora_params, stages
    from mzoo.plan.memory import stage_memory
    from mzoo.plan.profile import engine_profile
    from mzoo.plan.settings import Settings

    cfg = base[0]
    for tp in (1, 2):
        model = build_model(cfg, ParallelState.single(Layout(tp=tp)), device="meta")
        add_lora(model, cfg, LORA)
        engine = sum(p.numel() for _, p in adapter_parameters(model))
        stage = stages(cfg, Layout(tp=tp))[0]
        assert lora_params(cfg, as_model(cfg).kinds(stage.ranges), tp, LORA.rank, frozenset(LORA.parts)) == engine
    profile = engine_profile("bf16", False, "cuda")
    full = stage_memory(cfg, Layout(), Settings(32, 4, 2), profile, stages(cfg, Layout())[0])
    lora = stage_memory(cfg, Layout(), Settings(32, 4, 2, lora_rank=4, lora_parts=frozenset(LORA.parts)), profile,
                        stages(cfg, Layout())[0])
    adapters = lora_params(cfg, as_model(cfg).kinds(stages(cfg, Layout())[0].ranges), 1, 4, frozenset(LORA.parts))
    assert lora.weights == full.weights + adapters * profile.param
    assert lora.gradients == adapters * profile.grad
    assert lora.optimizer == adapters * (profile.master + profile.moments)


def test_cli_lora_finetune_saves_a_peft_adapter_and_generates_with_it(folder, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from mzoo.cli.main import app

    start = tmp_path / "start"
    shutil.copytree(folder / "model", start)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, start / f)
    out = tmp_path / "adapter"
    common = ["finetune", str(start), "--data", str(folder / "train.jsonl"), "--format", "prompt-completion",
              "--seq-len", "32", "--global-batch", "4", "--lr", "3e-3", "--json"]
    lora = ["--lora-rank", "4", "--lora-targets", "qkv,fc2"]
    result = CliRunner().invoke(app, common + lora + ["--steps", "3", "--save", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["adapter_config.json", "adapter_model.safetensors", "mzoo_optimizer.safetensors", "mzoo_rng",
         "mzoo_train_state.json"]
    # continue training from it, then generate with it
    again = CliRunner().invoke(app, common + ["--steps", "5", "--adapter", str(out), "--save", str(tmp_path / "a2")])
    assert again.exit_code == 0, again.output
    gen = CliRunner().invoke(app, ["generate", str(start), "--adapter", str(tmp_path / "a2"), "--prompt-ids",
                                   "5,9,17", "--max-new-tokens", "6", "--json"])
    assert gen.exit_code == 0, gen.output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(start), tmp_path / "a2").eval()
    want = hf.generate(input_ids=torch.tensor([[5, 9, 17]]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert json.loads(gen.output[gen.output.index("{"):])["generated_ids"] == want[0, 3:].tolist()
    dry = CliRunner().invoke(app, common + lora + ["--tp", "2", "--dry-run", "--dry-run-rank", "1"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.output[dry.output.index("{"):])
    trainable = [p for p in report["parameters"] if p["trainable"]]
    assert trainable and all(".lora." in p["name"] for p in trainable)
    assert report["trainable"] == sum(p["numel"] for p in trainable) < report["count"] / 10
    bad = CliRunner().invoke(app, common + lora + ["--save-format", "megatron", "--save", str(tmp_path / "m")])
    assert bad.exit_code == 2 and "saves a peft adapter" in bad.output


def test_lora_run_continues_from_its_adapter_as_one_run(folder, tmp_path):
    """A LoRA save carries the adapters' optimizer state and position (peft ignores the extra files):
    3 steps, then 2 more from the adapter, are the 5 steps of one run; the base gets no state."""
    import shutil

    from safetensors import safe_open
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    start = tmp_path / "start"
    shutil.copytree(folder / "model", start)
    common = ["finetune", str(start), "--data", str(folder / "train.jsonl"), "--format", "prompt-completion",
              "--tokenizer", str(folder), "--seq-len", "32", "--global-batch", "4", "--lr", "3e-3",
              "--schedule", "constant", "--warmup", "0", "--json"]

    def losses(*args):
        result = CliRunner().invoke(app, common + list(args))
        assert result.exit_code == 0, result.output
        return json.loads(result.output[result.output.index("{"):])["losses"]

    losses("--lora-rank", "4", "--steps", "3", "--save", str(tmp_path / "a"))
    with safe_open(str(tmp_path / "a" / "mzoo_optimizer.safetensors"), "pt") as f:
        assert f.keys() and all(".lora." in k for k in f.keys())
    continued = losses("--adapter", str(tmp_path / "a"), "--steps", "5", "--save", str(tmp_path / "b"))
    whole = losses("--lora-rank", "4", "--steps", "5")
    assert len(continued) == 2 and continued == pytest.approx(whole[3:], abs=1e-6)
    done = CliRunner().invoke(app, common + ["--adapter", str(tmp_path / "b"), "--steps", "5"])
    assert done.exit_code == 2 and "saved at step 5" in done.output


def test_mixtral_attention_adapter_round_trips_through_peft(tmp_path):
    """Mixtral: adapters on q/k/v/o (its MLPs are experts, not supported yet) give peft's logits;
    asking for fc1 on it is one sentence."""
    from conftest import make_moe_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, MixtralConfig

    from mzoo.converters.hf import read_config
    from mzoo.converters.peft import save_adapter
    from mzoo.errors import UserError
    from mzoo.parallel.lora import parse_targets

    make_moe_model(tmp_path / "mx", MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  num_local_experts=4, num_experts_per_tok=2,
                                                  max_position_embeddings=64))
    reader, adapter, cfg = read_config(tmp_path / "mx")
    model = build_model(cfg)
    load_canonical(model, lambda name: adapter.to_canonical(name, reader.get, cfg))
    lora = LoRAConfig(4, 8.0, parts=parse_targets("qkv,proj"))
    add_lora(model, cfg, lora, seed=1, b_std=0.05)
    with torch.no_grad():
        ours = model.eval()(IDS)
    out = save_adapter(cfg, lora, dict(adapter_parameters(model)), tmp_path / "adapter")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "mx"), out).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - ours).abs().max() <= 1e-4
    with pytest.raises(UserError, match="mixture of experts"):
        add_lora(build_model(cfg, device="meta"), cfg, LoRAConfig(4))


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "4", "--lora-targets", "experts"], "LoRA on routed experts is not supported yet"),
    (["--lora-rank", "4", "--lora-targets", "attn"], "unknown --lora-targets 'attn'"),
    (["--lora-rank", "0"], "--lora-rank 0 must be at least 1"),
    (["--lora-rank", "4", "--lora-dropout", "1.5"], "--lora-dropout 1.5 must be in [0, 1)"),
    (["--adapter", "{tmp}"], "is not a peft adapter"),
])
def test_bad_lora_flags_are_one_sentence(folder, tmp_path, flags, message):
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    args = ["finetune", str(folder / "model"), "--data", str(folder / "train.jsonl"), "--format",
            "prompt-completion", "--tokenizer", str(folder), "--save", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args + [f.replace("{tmp}", str(tmp_path)) for f in flags])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_plan_knows_lora_memory():
    """`mzoo plan --lora-rank`: llama3-8b fits one H100 for a LoRA finetune (base weights + adapter
    state), not for full finetuning (gradients and Adam state of 8B parameters)."""
    from typer.testing import CliRunner

    from mzoo.cli.main import app

    args = ["plan", "llama3-8b", "--gpus", "1", "--recompute", "selective", "--check", "tp=1", "--json"]
    full = CliRunner().invoke(app, args)
    lora = CliRunner().invoke(app, args + ["--lora-rank", "16"])
    assert full.exit_code == 1 and lora.exit_code == 0, lora.output
    (ours,) = json.loads(lora.output)
    (theirs,) = json.loads(full.output)
    assert ours["feasible"] and not theirs["feasible"]
    assert ours["memory"]["gradients_gb"] < 0.2 < 29 < theirs["memory"]["gradients_gb"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_peft_adapter_on_qwen_loads_into_mzoo_with_peft_logits(hf_factory, tmp_path, family):
    """Qwen2 (q/k/v biases without an o bias) and Qwen3 (per-head q/k norms, head_dim != hidden/heads):
    an adapter peft makes on all seven projections gives peft's logits in mzoo (the fused q/k/v rows
    interleave per query group around the base's biases and norms)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    from mzoo.converters.hf import load_hf_model
    from mzoo.converters.peft import read_adapter

    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    path = hf_factory(Qwen2Config(**kw) if family == "qwen2" else Qwen3Config(**kw, head_dim=16))
    torch.manual_seed(0)
    made = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]))
    made.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        theirs = made.eval()(IDS).logits
    cfg, model = load_hf_model(path)
    lora, tensors = read_adapter(tmp_path / "theirs", cfg)
    add_lora(model, cfg, lora)
    load_adapters(model, tensors)
    with torch.no_grad():
        ours = model.eval()(IDS)
    assert (ours - theirs).abs().max() <= 1e-4
