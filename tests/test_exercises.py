"""Checks for docs/exercises.md that no other test makes. Each passes against the shipped code;
the exercise says what to change and which of these (or of the other tests) then tells you."""

import pytest
import torch

import data
from machinery import models
import generate
import spin
from conftest import read_jsonl, tiny_mistral, toy_run
from test_theory import P_DATA, P_T, minimize, tabular_spin_loss


def exact_step(beta, loss_type="logistic"):
    return minimize(P_T, P_DATA, beta, loss_type)


def tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


# Exercise 5: Theorem 5.4 across λ.
def test_exercise_5_lambda_1_lands_larger_lambda_moves_part_way_smaller_overshoots():
    start = tv(P_T, P_DATA)
    distances = {beta: tv(exact_step(beta), P_DATA) for beta in (0.5, 1.0, 2.0, 4.0)}
    assert distances[1.0] < 1e-6  # one step lands on p_data
    assert 0 < distances[2.0] < distances[4.0] < start  # part of the way; less the larger λ
    # λ < 1 overshoots: p_{t+1}/p_data ∝ (p_t/p_data)^{1 − 1/λ}, an inverted order
    overshoot = (exact_step(0.5) / P_DATA).log()
    before = (P_T / P_DATA).log()
    assert torch.corrcoef(torch.stack([overshoot, before]))[0, 1] < -0.99


# Exercise 6: the data of iteration t − 1 mixed into iteration t.
@pytest.mark.parametrize("mix, pairs", [("--mix_previous_iteration", [60, 120]), ("--no-mix_previous_iteration", [60, 60])])
def test_exercise_6_mixing_the_previous_iteration_doubles_the_training_pairs(small_sft_model, tmp_path, mix, pairs):
    spin.main(toy_run(small_sft_model, tmp_path / "run", "--max_samples", 60, "--iters", 2, mix,
                      "--per_device_train_batch_size", 30))
    rows = read_jsonl(tmp_path / "run" / "iterations.jsonl")
    assert [r["pairs"] for r in rows] == pairs


# Exercise 7: greedy decoding picks the opponent's likeliest answers.
def test_exercise_7_greedy_responses_are_likelier_under_the_opponent_than_samples(small_sft_model):
    args = spin.parse_args(["--model", str(small_sft_model), "--dataset", "toy", "--max_length", "48",
                            "--max_prompt_length", "32"])
    tokenizer, model = models.load_model(args.model)
    rows = data.toy_rows("train")[:100]
    prompts = [data.ChatFormat(tokenizer).prompt_ids(r["messages"]) for r in rows]
    mean_logp = {}
    for greedy in (True, False):
        samples = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=12, do_sample=not greedy), seed=0)
        pairs = [{"prompt_ids": p, "real_ids": s["generated_ids"], "generated_ids": s["generated_ids"]}
                 for p, s in zip(prompts, samples)]
        spin.opponent_logps(model, pairs, args)
        mean_logp[greedy] = sum(p["opponent_generated_logp"] for p in pairs) / len(pairs)
    assert mean_logp[True] > mean_logp[False]


# Exercise 8: a new convex ℓ, the exponential loss ℓ(t) = e^{−t}.
def exponential(t):
    return torch.exp(-t)


def test_exercise_8_exponential_loss_keeps_the_fixed_point_of_theorem_5_2():
    logits = P_DATA.log().clone().requires_grad_(True)
    loss = tabular_spin_loss(logits, P_DATA, P_DATA, beta=0.1, loss_type=exponential)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=1e-12)  # ℓ(0) = 1
    assert logits.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0])
def test_exercise_8_exponential_loss_moves_half_as_far_as_logistic(beta):
    # for ℓ(t) = e^{−t} the best f is ½·log(p_data/p_t), so p_{t+1} ∝ p_t (p_data/p_t)^{1/(2λ)}
    expected = P_T * (P_DATA / P_T) ** (1 / (2 * beta))
    assert exact_step(beta, exponential).tolist() == pytest.approx((expected / expected.sum()).tolist(), abs=1e-6)


# Exercise 9: why the first loss of an iteration is exactly log 2, and what dropout does to it.
def test_exercise_9_dropout_breaks_the_first_step_identity(tokenizer):
    model = tiny_mistral(tokenizer)
    model.config.attention_dropout = 0.3  # Mistral's only dropout: on attention weights in training mode
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    prompt = data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": "12+34"}])
    pairs = [{"prompt_ids": prompt, "real_ids": data.ChatFormat(tokenizer).reply_ids([{"role": "user", "content": "12+34"}], "46"),
              "generated_ids": data.ChatFormat(tokenizer).reply_ids([{"role": "user", "content": "12+34"}], "12+34=46")}]
    args = spin.parse_args(["--model", "toy", "--max_length", "48", "--max_prompt_length", "32"])
    spin.opponent_logps(model, pairs, args)  # eval mode: no dropout
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        real, generated = spin.pair_logps(model, pairs, spin.Scoring.of_run(args))
    assert abs(real.item() - pairs[0]["opponent_real_logp"]) > 1e-3  # θ = θ_t, and yet log-ratio ≠ 0
    spin.disable_dropout(model)  # what spin.train does first
    with torch.no_grad():
        real, generated = spin.pair_logps(model, pairs, spin.Scoring.of_run(args))  # still in training mode
    assert real.item() == pytest.approx(pairs[0]["opponent_real_logp"], abs=1e-6)
    assert generated.item() == pytest.approx(pairs[0]["opponent_generated_logp"], abs=1e-6)
