"""spin.py: Algorithm 1 end to end on the toy, the first-step identity, and the command line."""
import json
import math
from pathlib import Path

import pytest
import torch

import data
from machinery import models
import generate
import spin
from conftest import TOY_RUN, read_jsonl, toy_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max_samples", "200", "--per_device_train_batch_size", "32", "--generation_batch_size", "200"]


@pytest.fixture(scope="module")
def two_iterations(small_sft_model, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    spin.main(toy_run(small_sft_model, run, "--iters", 2, *SMALL))
    return run


@pytest.mark.slow  # runs spin.py end to end (two_iterations)
def test_a_runs_config_json_is_a_config_file_that_repeats_the_run(two_iterations, capsys):
    recorded = json.loads((two_iterations / "config.json").read_text())
    args = spin.parse_args(["--config", str(two_iterations / "config.json")])
    assert {k: v for k, v in vars(args).items() if k in recorded} == recorded
    spin.main(["--config", str(two_iterations / "config.json")])  # the same run: found complete, nothing redone
    assert "iterations 0..1 are complete" in capsys.readouterr().out


@pytest.mark.slow  # runs spin.py end to end (two_iterations)
def test_each_iteration_saves_a_model_that_from_pretrained_loads(two_iterations, small_sft_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = AutoModelForCausalLM.from_pretrained(small_sft_model).state_dict()
    previous = start
    for t in range(2):
        path = two_iterations / f"iter{t}" / "model"
        assert (path / "model.safetensors").exists()
        AutoTokenizer.from_pretrained(path)
        weights = AutoModelForCausalLM.from_pretrained(path).state_dict()
        assert any(not torch.equal(weights[k], previous[k]) for k in weights)  # it trained
        previous = weights


@pytest.mark.slow  # runs spin.py end to end (two_iterations)
def test_synthetic_data_loads_with_datasets_and_as_a_spin_data_set(two_iterations):
    import datasets

    for t in range(2):
        path = two_iterations / f"iter{t}" / "synthetic.jsonl"
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
        assert len(rows) == 200 and len(set(rows["id"])) == 200
        assert set(rows["iteration"]) == {t}
        again = data.load_rows(str(path))  # the official real/generated schema: usable as --dataset
        assert [r["response"] for r in again] == [r[-1]["content"] for r in rows["real"]]


@pytest.mark.slow  # runs spin.py end to end (two_iterations)
def test_the_first_step_of_every_iteration_has_loss_log2_and_zero_rewards(two_iterations):
    metrics = read_jsonl(two_iterations / "iter0" / "metrics.jsonl") + read_jsonl(two_iterations / "iter1" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0] * 7 + [1] * 13  # 200 pairs, then 200 + 200 (t−1 mixed in)
    for first in (metrics[0], metrics[7]):
        assert first["step"] == 0
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert abs(first["real_reward"]) < 1e-5 and abs(first["generated_reward"]) < 1e-5
    assert all(set(m) >= {"loss", "margin", "reward_accuracy", "learning_rate", "grad_norm", "tokens_per_s"}
               for m in metrics)
    summary = read_jsonl(two_iterations / "iterations.jsonl")
    assert [s["pairs"] for s in summary] == [200, 400]
    assert all(0 <= s["tv_distance"] <= 1 and 0 <= s["accuracy"] <= 1 for s in summary)
    config = json.loads((two_iterations / "config.json").read_text())
    assert config["iters"] == 2 and config["beta"] == 1.0


@pytest.fixture(scope="module")
def toy_pairs(small_sft_model):
    args = spin.parse_args(["--model", str(small_sft_model), *TOY_RUN, *SMALL])
    tokenizer, model = models.load_model(args.model)
    rows = data.toy_rows("train")[:64]
    prompts = [data.ChatFormat(tokenizer).prompt_ids(r["messages"]) for r in rows]
    samples = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=12), seed=0)
    pairs = [{"prompt_ids": p, "real_ids": data.ChatFormat(tokenizer).reply_ids(r["messages"], r["response"]),
              "generated_ids": s["generated_ids"]} for r, s, p in zip(rows, samples, prompts)]
    spin.opponent_logps(model, pairs, args)
    return args, model, pairs


def test_policy_logps_at_theta_t_equal_the_stored_opponent_logps(toy_pairs):
    args, model, pairs = toy_pairs
    model.train()  # as in training, with other batch compositions than the opponent pass used
    batch = pairs[::-3][:11]
    real, generated = spin.pair_logps(model, batch, spin.Scoring.of_run(args))
    assert real.tolist() == pytest.approx([p["opponent_real_logp"] for p in batch], abs=1e-4)
    assert generated.tolist() == pytest.approx([p["opponent_generated_logp"] for p in batch], abs=1e-4)


def test_one_optimizer_step_raises_the_margin(toy_pairs, tmp_path):
    args, model, pairs = toy_pairs
    model = type(model).from_pretrained(args.model)  # a fresh copy: θ = θ_t
    args.per_device_train_batch_size, args.warmup_ratio, args.num_train_epochs = len(pairs), 0.0, 1
    history, trainer = spin.train(model, pairs, learning_rate=1e-4, iteration=0, args=args, iteration_dir=tmp_path)
    assert isinstance(trainer, spin.backends.Plain)  # no --deepspeed: the plain PyTorch path
    assert len(history) == 1 and history[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        real, generated = spin.pair_logps(model, pairs, spin.Scoring.of_run(args))
    real_logratios = real - torch.tensor([p["opponent_real_logp"] for p in pairs])
    generated_logratios = generated - torch.tensor([p["opponent_generated_logp"] for p in pairs])
    assert (real_logratios - generated_logratios).mean().item() > 0.05


def test_recipe_resolves_and_explicit_flags_override_it():
    args = spin.parse_args(["--model", "zephyr-7b-sft-full"])
    assert args.model == "alignment-handbook/zephyr-7b-sft-full" and args.recipe == "zephyr-7b-sft-full"
    assert (args.beta, args.learning_rate, args.max_samples, args.iters) == (0.1, [5e-7, 5e-7, 1e-7, 1e-7], 50_000, 4)
    args = spin.parse_args(["--model", "zephyr-7b-sft-full", "--beta", "0.5", "--learning_rate", "1e-6"])
    assert (args.beta, args.learning_rate, args.num_train_epochs) == (0.5, [1e-6], 2)


def grouping_args(group: bool, size: int = 8):
    return spin.parse_args(["--dataset", "toy", "--per_device_train_batch_size", str(size), "--num_train_epochs", "2",
                            "--max_length", "1024", "--max_prompt_length", "512", "--seed", "3",
                            "--group_by_length" if group else "--no-group_by_length"])


def mixed_length_pairs(n=1000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"id": i, "prompt_ids": [1] * int(torch.randint(8, 400, (1,), generator=generator)),
             "real_ids": [2] * int(torch.randint(4, 500, (1,), generator=generator)),
             "generated_ids": [3] * int(torch.randint(4, 256, (1,), generator=generator))} for i in range(n)]


def padding_share(steps, args):
    """The share of the padded sequence slots that are padding, over every step's 2B sequences."""
    real = padded = 0
    for _, step in steps:
        lengths = [min(args.max_length, min(len(p["prompt_ids"]), args.max_prompt_length) + len(p[k]))
                   for p in step for k in ("real_ids", "generated_ids")]
        real, padded = real + sum(lengths), padded + max(lengths) * len(lengths)
    return 1 - real / padded


def test_length_grouping_keeps_every_pair_once_per_epoch_in_a_seeded_order_with_little_padding():
    pairs = mixed_length_pairs()
    grouped, shuffled = grouping_args(True), grouping_args(False)
    steps = list(spin.batches(pairs, 0, grouped))
    assert steps == list(spin.batches(pairs, 0, grouped))  # a function of the seed: a resumed run sees the same steps
    assert steps != list(spin.batches(pairs, 1, grouped))  # another iteration, another order
    for epoch in (0, 1):
        ids = [p["id"] for e, step in steps if e == epoch for p in step]
        assert sorted(ids) == list(range(1000))
    assert [len(s) for _, s in steps] == [len(s) for _, s in spin.batches(pairs, 0, shuffled)]  # the same step count
    # Measured: 0.185 grouped, 0.442 shuffled; what is left is mostly the length difference of y and y' within a pair.
    assert padding_share(steps, grouped) < 0.25 < 0.40 < padding_share(spin.batches(pairs, 0, shuffled), shuffled)
