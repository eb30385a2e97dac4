"""Shared fixtures: everything is built on the spot, offline (no hub downloads)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the network

import toy  # noqa: E402


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
