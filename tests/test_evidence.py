"""The fast version of experiments/toy_evidence.py, and the properties any correct SPIN has;
not the headline numbers (docs/results.md reports those, from the full run)."""
import json
import math
from pathlib import Path

import pytest

from experiments import toy_evidence
from test_theory import P_DATA, P_T, minimize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    toy_evidence.main(["--fast", "--out", str(out)])
    return out


@pytest.mark.slow  # runs the toy experiment end to end
def test_every_spin_iteration_starts_at_log_2(fast):
    for run in [fast / "seed0-spin", *fast.glob("protocol-spin-*")]:
        for t in range(2):
            first = json.loads((run / f"iter{t}" / "complete.json").read_text())["first_loss"]
            assert first == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow  # runs the toy experiment end to end
def test_continued_sft_gets_exactly_spins_optimizer_steps_and_the_outputs_exist(fast):
    results = json.loads((fast / "results.json").read_text())
    [run] = results["runs"]
    assert [r["steps"] for r in run["sft"]] == [r["steps"] for r in run["spin"]] == [16, 32]  # 2 epochs of 512 pairs, then of 1024
    assert all(0 <= r["tv_distance"] <= 1 for r in run["spin"] + run["sft"])
    assert (fast / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((fast / "results.md").read_text().splitlines()) == 2 + 3  # header, rule, start + 2 iterations


@pytest.mark.parametrize("beta", [1.0, 2.0, 5.0])
def test_on_the_tabular_model_the_distance_to_p_data_shrinks_every_iteration_for_lambda_at_least_1(beta):
    p, distances = P_T, [0.5 * (P_T - P_DATA).abs().sum().item()]
    for _ in range(4):
        p = minimize(p, P_DATA, beta)  # one SPIN iteration, minimized exactly
        distances.append(0.5 * (p - P_DATA).abs().sum().item())
    assert all(b < a or b < 1e-6 for a, b in zip(distances, distances[1:])), distances
