"""The GPU smoke test: one command, one line per check, within a few minutes on one H100/H200.

    python -m benchmarks.smoke    # on a GPU: the CUDA path; on a CPU-only machine: the same on CPU

1. `spin.py` end to end on a tiny random Mistral (the toy's tokenizer and chat template),
   --bf16 with SDPA, 2 iterations, packed rows: it completes, and each iteration's first loss is
   log 2 within bf16 rounding (the opponent pass and step 0 score the same pairs in other batches).
2. The same under `--deepspeed configs/ds_zero3.json` on one rank (a group of one: the NCCL start of
   several ranks needs several GPUs, docs/scaling.md).
3. The same as 1 with --deterministic, killed by SIGKILL mid-training and resumed: the final weights
   equal an uninterrupted --deterministic run's bit for bit.
4. The suite's GPU-sensitive tests (tests/test_cuda.py, tests/test_logps.py) with the GPU visible
   (SPIN_TESTS_CUDA=1; the rest of the suite hides it, tests/conftest.py); on a CPU, test_cuda.py
   only (the suite runs test_logps.py anyway).
5. FlashAttention-2 in bf16, where flash-attn is installed on a GPU (else "skip"): packed rows
   against padded rows, the same log-probs and gradients to bf16 rounding.
6. The dtypes the KV cache holds after a short generate under bf16 with float32 weights (the plain
   --bf16 path): bf16 keys and values.
7. QLoRA under --bf16, where bitsandbytes is installed on a GPU (else "skip"): the compute dtype
   the 4-bit layers hold after a forward and backward, bf16.

Exit status 1 if any check failed. CI runs it on the CPU (tests/test_benchmarks.py).
"""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import toy
from machinery import distributed

ROOT = Path(__file__).resolve().parents[1]

# bf16 keeps 8 bits of mantissa. A pair's log-prob here sums ~20 tokens near -7 each (a random model
# over 40 tokens): the same sum from another batch shape moves by up to ~0.1, a first-step loss at λ
# 0.1 by far less; 0.02 is the bound on the mean of a step's losses.
FIRST_LOSS_TOLERANCE = {"bf16": 0.02, "float32": 1e-5}
# one step: nearly random
TINY = dict(sft_steps=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
FLAGS = ["--dataset", "toy", "--iters", "2", "--max_samples", "32", "--eval_samples", "8",
         "--max_new_tokens", "12",
         "--max_length", "48", "--max_prompt_length", "32", "--per_device_train_batch_size", "8",
         "--generation_batch_size", "32", "--num_train_epochs", "1", "--learning_rate", "1e-4",
         "--save_steps", "3", "--attn_implementation", "sdpa", "--padding_free", "--quiet"]


def spin(model: Path, out: Path, *extra: str, kill_mid_training: bool = False):
    """spin.py as a user runs it; returns (exit status, stderr tail). One CPU thread on a CPU:
    the same float sums from run to run (tests/test_resume.py)."""
    small = [] if torch.cuda.is_available() else ["--max_samples", "16"]  # CI's CPU mode: quick
    command = [sys.executable, "spin.py", "--model", str(model), "--output_dir", str(out), *FLAGS,
               *small, *extra]
    process = subprocess.Popen(command, cwd=ROOT,
                               env={**os.environ,
                                    **({} if torch.cuda.is_available()
                                       else {"OMP_NUM_THREADS": "1"})}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    if kill_mid_training:
        while not any((out / f"iter{t}" / "checkpoint").exists()
                      for t in (0, 1)) and process.poll() is None:
            time.sleep(0.05)  # the first saved training state: now it is mid-training
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    return process.returncode, err[-1500:]


def first_losses(out: Path) -> list[float]:
    return [json.loads((out / f"iter{t}" / "complete.json").read_text())["first_loss"]
            for t in range(2)]


def end_to_end(model: Path, work: Path, precision: str, *extra: str) -> str:
    out = work / ("run" + "".join(extra).replace("/", "_").replace("-", ""))
    code, err = spin(model, out, *(["--bf16"] if precision == "bf16" else []), *extra)
    assert code == 0, err
    losses = first_losses(out)
    worst = max(abs(x - math.log(2)) for x in losses)
    bound = FIRST_LOSS_TOLERANCE[precision]
    assert worst <= bound, f"first losses {losses}, log 2 ± {bound}"
    return f"first losses {', '.join(f'{x:.5f}' for x in losses)} (|x - log 2| ≤ {worst:.1e})"


def deterministic_resume(model: Path, work: Path, precision: str) -> str:
    from safetensors.torch import load_file

    bf16 = ["--bf16"] if precision == "bf16" else []
    whole, resumed = work / "whole", work / "resumed"
    assert spin(model, whole, *bf16, "--deterministic")[0] == 0
    code, _ = spin(model, resumed, *bf16, "--deterministic", kill_mid_training=True)
    assert code == -signal.SIGKILL, f"the run ended ({code}) before it could be killed"
    code, err = spin(model, resumed, *bf16, "--deterministic")
    assert code == 0, err
    a, b = (load_file(run / "iter1" / "model" / "model.safetensors") for run in (whole, resumed))
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} weights differ, e.g. {different[0]}"
    return f"killed at the first saved state, resumed: all {len(a)} weights equal bit for bit"


class Skipped(Exception):
    """A check that cannot run on this machine (reported as "skip", not as a failure)."""


def flash_attention_rows() -> str:
    """FlashAttention-2 in bf16 on a small random Mistral: the same sequences packed (one row,
    varlen) and padded (a row per sequence, unpadded inside transformers), log-probs and the
    gradients of their sum. bf16 keeps 8 bits of mantissa: a log-prob sum of ~40 tokens moves by
    up to ~0.3 between layouts (BF16_LOGP_TOLERANCE of tests/test_cuda.py, 0.5), the gradient by a
    few bf16 roundings (~4e-3 each) relative to its norm: bound 5e-2."""
    import importlib.util

    from transformers import MistralConfig, MistralForCausalLM

    from machinery import logps

    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        raise Skipped("needs a CUDA GPU and flash-attn")
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, attn_implementation="flash_attention_2")).cuda()
    g = torch.Generator().manual_seed(0)
    lengths = [(5, 7), (12, 3), (2, 2), (9, 30), (20, 11)]  # (prompt, reply) tokens
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n, _ in lengths]
    replies = [torch.randint(3, 1000, (n,), generator=g).tolist() for _, n in lengths]
    result = {}
    for packed in (False, True):
        model.zero_grad()
        scoring = logps.Scoring(64, 128, bf16=True, padding_free=packed)
        sums, _ = logps.score(model, prompts, replies, scoring)  # (S,)
        sums.sum().backward()
        result[packed] = sums.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
    (padded, padded_grad), (packed, packed_grad) = result[False], result[True]
    worst = (packed - padded).abs().max().item()
    relative = ((packed_grad - padded_grad).norm() / padded_grad.norm()).item()
    assert worst <= 0.5 and relative <= 5e-2, \
        f"log-probs {worst:.2e} apart, gradients {relative:.1e} relative"
    return (f"{len(lengths)} sequences, packed vs padded: log-probs within {worst:.1e} (bound "
            f"0.5), gradients' relative difference {relative:.1e} (bound 5e-2)")


def kv_cache_dtypes(model_path: Path) -> str:
    """generate.generate under bf16 with float32 weights, as the plain --bf16 path samples: the
    KV cache's dtypes after a few tokens (RoPE once made the keys float32, docs/scaling.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import generate

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    caches = []
    handle = model.register_forward_hook(lambda module, inputs, out: caches.append(out.cache))
    try:
        generate.generate(model, tokenizer, [tokenizer("1+2=")["input_ids"]],
                          generate.Sampling(max_new_tokens=4, bf16=True), seed=0)
    finally:
        handle.remove()
    found = sorted({f"keys {layer.keys.dtype}, values {layer.values.dtype}"
                    for layer in caches[-1].layers})
    assert found == ["keys torch.bfloat16, values torch.bfloat16"], found
    return f"{len(caches[-1].layers)} layers, each: {found[0]}"


def qlora_compute_dtype(model_path: Path) -> str:
    """QLoRA as spin.py builds it under --bf16 (the base in 4 bits, prepared, adapters on): the
    compute dtype every bitsandbytes Linear4bit holds after a forward and backward under bf16
    autocast. bf16, though most of their inputs are float32 (adapters.hold_compute_dtype)."""
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise Skipped("needs a CUDA GPU and bitsandbytes")
    import bitsandbytes

    import spin as spin_py  # this file's spin() runs the command
    from machinery import adapters, models

    args = spin_py.parse_args(["--model", str(model_path), "--dataset", "toy", "--use_peft",
                               "--load_in_4bit", "--bf16", "--gradient_checkpointing"])
    _, model = models.load_model(str(model_path), quantization=adapters.quantization(args))
    model = adapters.wrap(model, args).train()
    ids = torch.randint(3, 40, (2, 16), device=model.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    held = sorted({str(m.compute_dtype) for m in layers})
    assert held == ["torch.bfloat16"], held
    return f"{len(layers)} Linear4bit layers, each computing in {held[0]} after a forward"


def gpu_tests() -> str:
    files = ["tests/test_cuda.py",
             "tests/test_logps.py"] if torch.cuda.is_available() else ["tests/test_cuda.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *files], cwd=ROOT, env={**os.environ, "SPIN_TESTS_CUDA": "1"},
                            capture_output=True, text=True, timeout=400)
    out = result.stdout.strip()
    summary = out.splitlines()[-1] if out else result.stderr[-500:]
    assert result.returncode == 0, result.stdout[-2000:]
    return summary


def main() -> int:
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    # bf16 autocast on a CPU is slow and not what this checks there
    precision = "bf16" if cuda else "float32"
    print(f"smoke test on {device}, torch {torch.__version__}, {precision}", flush=True)
    note = distributed.cpu_build_note(torch.version.cuda)  # a GPU that torch cannot see
    if note:
        print(note, flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = toy.sft_model_path(str(work / "cache"), **TINY)
        checks = [
            (f"spin.py, {precision}, SDPA, packed rows",
             lambda: end_to_end(model, work, precision)),
            ("spin.py --deepspeed ZeRO-3, one rank",
             lambda: end_to_end(model, work, precision, "--deepspeed",
                                                                        "configs/ds_zero3.json")),
            ("--deterministic resume after SIGKILL",
             lambda: deterministic_resume(model, work, precision)),
            ("GPU-sensitive tests", gpu_tests),
            ("FlashAttention-2, bf16, packed vs padded rows", flash_attention_rows),
            ("KV cache after generate, bf16", lambda: kv_cache_dtypes(model)),
            ("QLoRA's 4-bit layers, bf16", lambda: qlora_compute_dtype(model)),
        ]
        for name, check in checks:
            started = time.time()
            try:
                detail, status = check(), "ok  "
            except Skipped as e:
                detail, status = str(e), "skip"
            except Exception as e:  # noqa: BLE001 - every check reports, then the next one runs
                detail, status = f"{type(e).__name__}: {e}".replace("\n", " ")[:600], "FAIL"
                failed += 1
            print(f"{status} {name} ({time.time() - started:.0f} s): {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
