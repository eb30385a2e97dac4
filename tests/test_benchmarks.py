"""benchmarks/logprobs.py in its quick mode, and the memory property it measures, exactly."""
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import logprobs  # noqa: E402
from loss import sequence_logps  # noqa: E402


def test_the_quick_benchmark_runs_and_prints_its_table():
    result = subprocess.run([sys.executable, "benchmarks/logprobs.py", "--quick"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n| float32 |") == 1 and result.stdout.count("\n| bfloat16 |") == 1


def test_lean_log_probs_keep_only_the_response_positions_for_backward():
    b, t, v = 2, 64, 1000
    logits, labels = logprobs.inputs(b, t, v, torch.float32)
    responses = int((labels[:, 1:] != -100).sum())  # 2 × 32 of the 2 × 63 scored positions
    lean = logprobs.saved_bytes(sequence_logps, logits, labels)
    # the (N, V) float32 response logits, plus per-position vectors (mask, indices, logsumexp): < 8 KiB here
    assert responses * v * 4 <= lean < responses * v * 4 + 8192
    assert logprobs.saved_bytes(logprobs.naive_sequence_logps, logits, labels) >= b * (t - 1) * v * 4
    assert torch.allclose(sequence_logps(logits, labels), logprobs.naive_sequence_logps(logits, labels), atol=1e-4)
