"""Shared fixtures: everything is built on the spot, offline (no hub downloads)."""
import json
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the network
os.environ["WANDB_MODE"] = "offline"  # --report_to wandb: files in the run directory only
os.environ["WANDB_SILENT"] = "true"
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="spin-tests-trackio-")  # --report_to trackio: a database here
# The suite means CPU: its exact numbers (bit-for-bit resume, float32 tolerances) and its two-rank runs
# (DS_ACCELERATOR=cpu) are CPU facts. On a machine with GPUs they are hidden, before torch looks for them,
# and the runs it launches inherit that; SPIN_TESTS_CUDA=1 keeps them for the tests that mean the GPU
# (tests/test_cuda.py, run by benchmarks/smoke.py).
if os.environ.get("SPIN_TESTS_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import toy  # noqa: E402 (after CUDA is hidden, before torch looks for it)

# The toy run every end-to-end test starts from; a test adds --model, --output_dir and what it
# changes (argparse keeps a flag's last value, so an override is simply appended).
TOY_RUN = ["--dataset", "toy", "--num_train_epochs", "1", "--learning_rate", "1e-4", "--beta", "1",
           "--max_length", "48", "--max_prompt_length", "32", "--max_new_tokens", "12", "--quiet"]


def toy_run(model, output_dir, *extra) -> list[str]:
    """spin.py's flags for a toy run of `model` into `output_dir`."""
    return ["--model", str(model), *TOY_RUN, "--output_dir", str(output_dir), *map(str, extra)]


def read_jsonl(path) -> list[dict]:
    """Every line of a JSONL file the run wrote; a torn line fails the test (unlike checkpoint.read_jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="session")
def tokenizer():
    return toy.build_tokenizer()


def tiny_mistral(tokenizer, seed=0, hidden=32, layers=2):
    """A randomly initialised MistralForCausalLM small enough for exact tests."""
    return toy.new_model(tokenizer, dict(toy.SFT, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, seed=seed)).eval()


@pytest.fixture(scope="session")
def small_sft_model(tmp_path_factory):
    """A weak toy SFT model (60 steps, a few seconds), cached for the session."""
    return toy.sft_model_path(str(tmp_path_factory.mktemp("cache")), sft_steps=60, num_prompts=300)


@pytest.fixture(scope="session")
def real_evidence_fast(tmp_path_factory):
    """experiments/real_evidence.py --fast, once: its seed0-spin directory is also the suite's end-to-end
    SPIN run of a real chat model (tests/test_chat_models.py), its checks in tests/test_real_evidence.py."""
    from experiments import real_evidence

    out = tmp_path_factory.mktemp("real-evidence")
    real_evidence.main(["--fast", "--out", str(out)])
    return out
