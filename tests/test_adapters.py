"""--use_peft: SPIN with LoRA adapters carried across iterations (machinery/adapters.py), on the toy.
θ_t is the base plus iteration t's adapter; the first loss is log 2 at every iteration, the opponent's
stored log-probs are θ_t's, checkpoints load as users expect, resume survives SIGKILL and SIGTERM bit
for bit. LoRA under ZeRO-3 on two CPU ranks: tests/test_zero3.py."""
import json
import math
import signal

import pytest
import torch
from safetensors.torch import load_file

import spin
from conftest import read_jsonl, tiny_mistral, toy_run
from machinery import logps, models
from test_resume import kill_when, run_to_end

peft = pytest.importorskip("peft", reason="--use_peft needs peft (requirements.txt)")

FLAGS = ["--use_peft", "--lora_r", 8, "--gradient_checkpointing", "--max_samples", 48, "--per_device_train_batch_size", 16, "--iters", 2,
         "--eval_samples", 16, "--generation_batch_size", 64, "--save_steps", 2]


@pytest.fixture(scope="module")
def lora_run(small_sft_model, tmp_path_factory):
    """The adapter run every test reads, as test_resume.py runs spin.py (one CPU thread): also the
    uninterrupted reference of the resume test."""
    run = tmp_path_factory.mktemp("lora") / "run"
    run_to_end(small_sft_model, run, *map(str, FLAGS))
    return run


@pytest.mark.slow  # runs spin.py end to end in a process (lora_run)
def test_every_iteration_starts_at_log_2_and_trains_only_the_adapters(lora_run, small_sft_model):
    for t in range(2):
        first = read_jsonl(lora_run / f"iter{t}" / "metrics.jsonl")[0]
        # θ = θ_t exactly: the opponent pass and step 0 score the same pairs in other batches, which
        # float32 sums in another order (~1e-6)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    saved = load_file(lora_run / "iter1" / "model" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapters, and nothing else
    # every B started at 0 and moved, the first layer's too: the gradient reaches the adapters through
    # gradient checkpointing's recomputed layers, whose inputs (frozen embeddings) need no gradient
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    assert any(".layers.0." in k for k in saved)
    config = json.loads((lora_run / "iter1" / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(small_sft_model) and config["r"] == 8
    card = (lora_run / "iter1" / "model" / "README.md").read_text()
    assert "library_name: peft" in card


def scored(model, pairs, run):
    """(log p(y|x), log p(y'|x)) of pairs, as the opponent pass of `run` computes them (its settings)."""
    args = spin.parse_args(["--config", str(run / "config.json")])
    copies = [dict(p) for p in pairs]
    spin.opponent_logps(model, copies, args)
    return torch.tensor([[p["opponent_real_logp"], p["opponent_generated_logp"]] for p in copies])


@pytest.mark.slow  # runs spin.py end to end in a process (lora_run)
def test_the_opponent_of_iteration_1_is_exactly_the_saved_adapter_of_iteration_0(lora_run):
    pairs = read_jsonl(lora_run / "iter1" / "synthetic.jsonl") + read_jsonl(lora_run / "iter0" / "synthetic.jsonl")
    stored = {(s["iteration"], s["id"]): s for s in read_jsonl(lora_run / "iter1" / "opponent_logps.jsonl")}
    expected = torch.tensor([[stored[(p["iteration"], p["id"])]["opponent_real_logp"],
                              stored[(p["iteration"], p["id"])]["opponent_generated_logp"]] for p in pairs])
    _, model = models.load_model(str(lora_run / "iter0" / "model"))  # base + adapter, as spin.py loads θ_1
    assert isinstance(model, peft.PeftModel)
    # the same pairs in the same batches through the same code: only float32 rounding could differ
    assert torch.allclose(scored(model, pairs, lora_run), expected, atol=1e-5)


@pytest.mark.slow  # runs spin.py end to end in a process (lora_run)
def test_checkpoints_load_with_peft_and_with_transformers_and_the_merged_model_is_base_plus_adapter(lora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    path = lora_run / "iter1" / "model"
    pairs = read_jsonl(lora_run / "iter1" / "synthetic.jsonl")[:16]
    with_peft = AutoPeftModelForCausalLM.from_pretrained(str(path))
    with_transformers = AutoModelForCausalLM.from_pretrained(str(path))  # transformers reads adapters with peft
    merged = AutoModelForCausalLM.from_pretrained(str(lora_run / "merged"))  # a plain model: no peft needed
    assert not isinstance(merged, peft.PeftModel) and (lora_run / "merged" / "model.safetensors").exists()
    reference = scored(with_peft, pairs, lora_run)
    assert torch.allclose(scored(with_transformers, pairs, lora_run), reference, atol=1e-5)  # same weights
    # merging adds B·A into each weight: the same function, rounded once more in float32
    assert torch.allclose(scored(merged, pairs, lora_run), reference, atol=1e-3)
    assert logps.fused_head(merged) and logps.fused_head(with_peft)  # the fast path serves both


@pytest.mark.slow  # starts processes and kills them
def test_an_adapter_run_stopped_by_sigkill_and_by_sigterm_resumes_to_the_same_adapter_bit_for_bit(
        small_sft_model, tmp_path, lora_run):
    """Killed mid-training in iteration 0 (after its first saved state), run again, stopped by
    SIGTERM in iteration 1 (the step in progress is finished and saved, exit 75), run again to the
    end by the same command: the final adapters equal the uninterrupted run's (lora_run: the same
    flags, one CPU thread) exactly."""
    run, uninterrupted = tmp_path / "run", lora_run
    extra = [str(f) for f in FLAGS]
    killed = kill_when(small_sft_model, run, lambda r: (r / "iter0" / "checkpoint").exists(), extra=extra)
    assert killed is not None and killed[0] == -signal.SIGKILL
    stopped = kill_when(small_sft_model, run, lambda r: (r / "iter1" / "metrics.jsonl").exists(),
                        sig=signal.SIGTERM, extra=extra)
    assert stopped is not None and stopped[0] == 75, stopped  # preemption.EXIT_RESUMABLE
    assert "stopped by SIGTERM in iteration 1" in stopped[1]
    assert not (run / "iter1" / "complete.json").exists()
    stdout = run_to_end(small_sft_model, run, *extra)
    assert "iteration 1: resuming training at step" in stdout
    a = load_file(uninterrupted / "iter1" / "model" / "adapter_model.safetensors")
    b = load_file(run / "iter1" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit"], "--load_in_4bit needs --use_peft"),
    (["--use_peft", "--lora_target_modules", "no_such_proj"], "--lora_target_modules no_such_proj:"),
    pytest.param(["--use_peft", "--load_in_4bit"], "bitsandbytes' CPU kernels pass no gradient",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")),
    (["--use_peft", "--load_in_4bit", "--deepspeed", "configs/ds_zero3.json"],
     "--load_in_4bit/--load_in_8bit with --deepspeed is not supported"),
])
def test_bad_adapter_flags_are_one_line_and_exit_2(small_sft_model, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    code = spin.cli(toy_run(small_sft_model, run, *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not run.exists()


@pytest.mark.slow  # runs spin.py end to end in a process (lora_run)
def test_an_adapter_whose_base_is_gone_is_refused_in_one_line(lora_run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in (lora_run / "iter0" / "model").iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    code = spin.cli(toy_run(adapter, tmp_path / "run", "--use_peft"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "base model '/nowhere/base' is missing" in err[0], err


def test_4bit_layers_compute_in_bf16_under_bf16_though_fed_float32(tokenizer, tmp_path):
    """QLoRA under --bf16 (issue 31, finding 4): a base as spin.py loads it (models.load_model
    with adapters.quantization), prepared and wrapped (adapters.wrap); after a forward and backward
    under bf16 autocast every bitsandbytes Linear4bit holds bf16 as its compute dtype, though the
    unquantized parts (float32) hand most of them float32 inputs. On a CPU bitsandbytes runs these
    layers (spin.py refuses QLoRA training there, machinery/cli.py); benchmarks/smoke.py checks the
    same on a GPU."""
    bnb = pytest.importorskip("bitsandbytes", reason="--load_in_4bit needs bitsandbytes")
    from machinery import adapters

    base = tmp_path / "base"
    tiny_mistral(tokenizer, hidden=64).save_pretrained(base)
    tokenizer.save_pretrained(base)
    flags = toy_run(base, tmp_path / "run", "--use_peft", "--bf16", "--gradient_checkpointing")
    args = spin.parse_args(flags)
    args.load_in_4bit = True  # spin.py refuses it on a CPU, before anything loads
    _, model = models.load_model(str(base), quantization=adapters.quantization(args))
    model = adapters.wrap(model, args).train()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 7 * model.config.num_hidden_layers  # q k v o gate up down: all-linear
    inputs = {}

    def record(module, x):  # returns None: the input goes on unchanged
        inputs[module] = x[0].dtype

    for layer in layers.values():
        layer.register_forward_pre_hook(record)
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    # o_proj's input is attention's output, bf16 under autocast; the others get the float32 norms'
    # outputs and the float32 sums of base and adapter outputs
    assert {n for n, layer in layers.items() if inputs[layer] == torch.float32} == {
        n for n in layers if not n.endswith("o_proj.base_layer")}
    assert {layer.compute_dtype for layer in layers.values()} == {torch.bfloat16}
