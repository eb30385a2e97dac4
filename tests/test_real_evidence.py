"""The fast version of experiments/real_evidence.py on the real chat model (the packaged SmolLM2 GGUF
and chitchat's human conversations), and its measures on hand-made cases. Properties any correct
run has, not the headline numbers (docs/results.md reports those, from the full run)."""
import json
import math
from pathlib import Path

import pytest

from conftest import read_jsonl
from experiments import real_evidence

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fast(real_evidence_fast):
    return real_evidence_fast


@pytest.mark.slow  # loads the packaged real model and runs it end to end
def test_the_sft_start_is_the_epoch_with_the_lowest_validation_loss(fast):
    curve = json.loads((fast / "sft_curve.json").read_text())
    [chosen] = [c for c in curve if c["chosen"]]
    assert chosen["validation_loss"] == min(c["validation_loss"] for c in curve)
    assert [c["epoch"] for c in curve] == list(range(len(curve))) and len(curve) >= 2


@pytest.mark.slow  # loads the packaged real model and runs it end to end
def test_spin_starts_every_iteration_at_log_2_and_sft_gets_exactly_its_steps(fast):
    results = json.loads((fast / "results.json").read_text())
    [run] = results["runs"]
    for t in range(2):
        first = read_jsonl(fast / "seed0-spin" / f"iter{t}" / "metrics.jsonl")[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert run["steps"] == [1, 1]  # 4 prompts, batches of 8, 1 epoch; iteration 1 also trains on iteration 0's pairs
    assert [len(read_jsonl(fast / "seed0-sft" / "eval" / f"model{s}.jsonl")) for s in range(3)] == [4, 4, 4]
    assert run["spin"][0] == run["sft"][0]  # one start, measured once
    assert run["spin"][1] != run["sft"][1]
    assert len(run["replies"]["spin"]) == len(run["replies"]["sft"]) == 3


@pytest.mark.slow  # loads the packaged real model and runs it end to end
def test_the_splits_are_disjoint_and_spin_prompts_come_from_the_sft_pool(fast):
    texts = {name: [tuple(m["content"] for m in r["messages"]) for r in read_jsonl(fast / "data" / f"{name}.jsonl")]
             for name in ("pool", "prompts", "validation", "test")}  # (first turn, human reply) of each conversation
    assert set(texts["prompts"]) <= set(texts["pool"])
    assert not set(texts["pool"]) & set(texts["validation"]) and not set(texts["pool"]) & set(texts["test"])
    assert (fast / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distinct_n_and_the_length_distance_on_hand_made_replies(tmp_path):
    assert real_evidence.distinct([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert real_evidence.distinct([[1, 2], [1, 2]], 1) == pytest.approx(2 / 4)
    samples = [{"generated_ids": [5, 6, 2], "ended": True, "real_logp": -3.0, "real_tokens": 3, "generated_logp": -1.0,
                "real_length": 3},
               {"generated_ids": [5, 6, 7, 8], "ended": False, "real_logp": -5.0, "real_tokens": 2,
                "generated_logp": -2.0, "real_length": 2}]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "model0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    [row] = real_evidence.measures(tmp_path, 0, human=[[1], [1, 2, 3, 4, 5]])
    assert row["length"] == 3  # 2 (the stop id is not counted) and 4
    assert row["length_distance"] == pytest.approx((abs(2 - 1) + abs(4 - 5)) / 2)  # sorted against sorted: W1
    assert row["logp_per_token"] == pytest.approx(-8 / 5)
    assert row["ended"] == 0.5 and row["margin"] is None
