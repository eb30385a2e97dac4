"""Loads toy_sum.jsonl from beside this file, wherever lm-eval is run from."""
from pathlib import Path

import datasets


def load(**kwargs) -> dict:
    path = Path(__file__).with_name("toy_sum.jsonl")
    return {"test": datasets.load_dataset("json", data_files=str(path), split="train")}
