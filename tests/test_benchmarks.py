"""The benchmarks in their quick modes, and the memory property benchmarks/logprobs.py measures, exactly."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import logprobs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # starts a process
def test_the_quick_logprobs_benchmark_runs_and_prints_its_table():
    result = subprocess.run([sys.executable, "-m", "benchmarks.logprobs", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n| 1000 | float32 |") == 1 and result.stdout.count("\n| 1000 | bfloat16 |") == 1


def test_lean_log_probs_keep_only_the_response_logits_for_backward():
    b, t, h, v = 2, 64, 16, 1000
    hidden, weight, labels = logprobs.inputs(b, t, h, v, torch.float32)
    responses = int((labels[:, 1:] != -100).sum())  # 2 × 32 of the 2 × 63 scored positions
    lean = logprobs.saved_bytes(logprobs.lean, hidden, weight, labels)
    # the (N, V) response logits in their own dtype, plus (N, H) hidden rows and per-position vectors
    assert responses * v * 4 <= lean < responses * (v + h) * 4 + 8192
    assert logprobs.saved_bytes(logprobs.naive, hidden, weight, labels) >= b * (t - 1) * v * 4
    assert torch.allclose(logprobs.lean(hidden, weight, labels), logprobs.naive(hidden, weight, labels), atol=1e-4)


def test_the_fused_head_keeps_no_logits_for_backward():
    b, t, h, v = 2, 64, 16, 1000
    hidden, weight, labels = logprobs.inputs(b, t, h, v, torch.float32)
    responses = int((labels[:, 1:] != -100).sum())
    fused = logprobs.saved_bytes(logprobs.fused, hidden, weight, labels)
    assert fused < responses * (h + 4) * 4 + 8192  # the (N, H) hidden rows and per-position vectors: no (N, V)
    assert torch.allclose(logprobs.fused(hidden, weight, labels), logprobs.naive(hidden, weight, labels), atol=1e-4)


@pytest.mark.slow  # starts a process
def test_the_quick_trl_comparison_runs_and_computes_what_trl_computes():
    """Quick mode; the first-step loss and rewards of spin.train and TRL's DPOTrainer, policy ≠ opponent."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.trl_compare", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agree to 1e-06: yes" in result.stdout and "agree to 1e-04: yes" in result.stdout
    diffs = [float(line.split("|diff|")[1]) for line in result.stdout.splitlines() if "|diff|" in line]
    assert len(diffs) == 6 and max(diffs[:3]) < 1e-6 and max(diffs[3:]) < 1e-4  # the exact path, then the default
    assert all(f"\n| {v} |" in result.stdout for v in ("spin", "trl", "trl_precompute"))


@pytest.mark.slow  # starts a process
def test_the_quick_generation_benchmark_runs_and_both_ways_give_the_same_tokens():
    result = subprocess.run([sys.executable, "-m", "benchmarks.generation", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same tokens from both: yes" in result.stdout
    assert "\n| data-set order |" in result.stdout and "\n| generate.py |" in result.stdout


@pytest.mark.slow  # starts a process
def test_the_tiny_gpu_benchmark_runs_every_phase_plain_and_under_zero3():
    """benchmarks/gpu.py --tiny on the CPU: the script a GPU session runs, checked to run end to end."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--prompts", "8"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("plain", "zero3"):
        for phase in ("generation", "opponent pass", "training"):
            assert f"\n| {run} | {phase} |" in result.stdout
    assert "iteration 0 (50000 pairs)" in result.stdout and "iteration 1 (100000 pairs)" in result.stdout


@pytest.mark.slow  # starts a process
def test_the_smoke_test_passes_every_check_on_the_cpu():
    """benchmarks/smoke.py in its CPU mode: the one command a GPU session runs first, checked to run."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.smoke"], cwd=ROOT, capture_output=True, text=True,
                            timeout=400)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0 and len(lines) == 5 and all(line.startswith("ok") for line in lines), \
        result.stdout[-3000:] + result.stderr[-2000:]
    assert "all 21 weights equal bit for bit" in result.stdout
    assert "2 layers, each: keys torch.bfloat16, values torch.bfloat16" in result.stdout
    assert "skip FlashAttention-2, bf16, packed vs padded rows" in result.stdout  # no GPU, no flash-attn


@pytest.mark.slow  # starts a process
def test_the_quick_memory_benchmark_compares_full_lora_and_qlora():
    """benchmarks/memory.py --quick: the configurations run (QLoRA on a GPU only), adapters train fewer."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in result.stdout.splitlines()
            if line.startswith(("| full", "| lora", "| qlora"))}
    assert set(rows) == {"full", "lora", "qlora"} if torch.cuda.is_available() else {"full", "lora"}
    trainable = {k: int(v[0].replace(",", "")) for k, v in rows.items()}
    assert trainable["lora"] == trainable.get("qlora", trainable["lora"]) < trainable["full"]
    assert float(rows["full"][3]) == 1.0 and float(rows["full"][4]) == 1.0  # the ratios' baseline
