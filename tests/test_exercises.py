"""The checks of docs/exercises.md. Each grades the student's answers in docs/answers.py against
what the code computes: it skips an exercise whose answers are still None, fails a wrong answer
and passes a right one. Exercises 2 and 3 change loss.py: their checks run the student's code.

The tests at the end check the checks: the solutions (docs/solutions/answers.py) pass every one,
a wrong value for any one answer fails its exercise's check, an unanswered exercise is skipped,
and exercise 9's check fails once spin.train no longer disables dropout.
"""
import functools
import importlib
import math
import types

import pytest
import torch

import data
import generate
import loss
import spin
from conftest import ROOT, read_jsonl, tiny_mistral, toy_run
from machinery import evaluation, models
from test_theory import P_DATA, P_T, minimize, tabular_spin_loss

HAND = 1e-3  # an answer worked out by hand may be rounded to 3 decimals


class Setting:
    """What a check runs on: pytest's fixtures (tokenizer, tmp_path, monkeypatch, the models and
    runs below), fetched when the check first asks, so that a skipped check builds nothing."""

    def __init__(self, request):
        self.request = request

    def __getattr__(self, name):
        return self.request.getfixturevalue(name)


@pytest.fixture
def setting(request):
    return Setting(request)


@pytest.fixture
def answers():
    """docs/answers.py as the student left it."""
    return importlib.import_module("docs.answers")


def given(answers, *names):
    """The answers to one exercise; the check is skipped while any of them is None."""
    missing = [name for name in names if getattr(answers, name) is None]
    if missing:
        pytest.skip(f"not answered yet: {', '.join(missing)} in docs/answers.py")
    return [getattr(answers, name) for name in names]


def tv(p, q) -> float:
    return 0.5 * (p - q).abs().sum().item()


def toy_pairs(tokenizer, n=8) -> list[dict]:
    """n toy pairs: the human answer as y, another of the prompt's correct forms as y'."""
    chat = data.ChatFormat(tokenizer)
    pairs = []
    for row in data.toy_rows("train")[:n]:
        other = next(y for y in data.toy_p_data(row["messages"][0]["content"])
                     if y != row["response"])
        pairs.append({"prompt_ids": chat.prompt_ids(row["messages"]),
                      "real_ids": chat.reply_ids(row["messages"], row["response"]),
                      "generated_ids": chat.reply_ids(row["messages"], other)})
    return pairs


def toy_args(*extra):
    """The toy's flags (python spin.py), with per_device_train_batch_size etc. in `extra`."""
    return spin.parse_args(["--model", "toy", "--quiet", *map(str, extra)])


# Exercise 1: Eq. 4.7 by hand.
def test_exercise_1_eq_4_7_by_hand(answers, setting):
    real_reward, generated_reward, margin, ell = given(
        answers, "EX1_REAL_REWARD", "EX1_GENERATED_REWARD", "EX1_MARGIN", "EX1_LOSS")
    losses, real, generated = loss.spin_loss(  # log p_θ(y), log p_θ(y'), log p_θt(y), log p_θt(y')
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]),
        beta=0.5)
    assert real_reward == pytest.approx(real.item(), abs=HAND), "the real reward"
    assert generated_reward == pytest.approx(generated.item(), abs=HAND), "the generated reward"
    assert margin == pytest.approx((real - generated).item(), abs=HAND), "the margin"
    assert ell == pytest.approx(losses.item(), abs=HAND), "ℓ(t)"


# Exercise 2: the hinge, its value and its gradient (the student's loss.py).
def test_exercise_2_the_hinge_has_its_value_and_its_gradient(answers, setting):
    policy_real = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    policy_generated = torch.tensor([-1.0, 1.0, -2.0], requires_grad=True)
    opponent = torch.zeros(3)  # so the log-ratios are the policy's log-probs
    losses, _, _ = loss.spin_loss(policy_real, policy_generated, opponent, opponent, beta=0.5,
                                  loss_type="hinge")
    # t = 0.5·(real − generated) = [0.5, 0, 2.5], so max(0, 1 − t) = [0.5, 1, 0]; 1e-7: float32
    assert losses.tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-7)
    assert losses.requires_grad, "ℓ must pass the gradient on to the policy's log-probs"
    losses.sum().backward()
    # ∂ℓ/∂t = −1 where t < 1 and 0 where t > 1; ∂t/∂log p_θ(y) = λ, ∂t/∂log p_θ(y') = −λ
    assert policy_real.grad.tolist() == pytest.approx([-0.5, -0.5, 0.0], abs=1e-7)
    assert policy_generated.grad.tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-7)


# Exercise 3 is checked by tests/test_loss.py -k naive, which fails while the shift is broken.


# Exercise 4: identical answers teach nothing.
def test_exercise_4_identical_answers_teach_nothing(answers, setting):
    gradient, share = given(answers, "EX4_GRADIENT", "EX4_WASTED_SHARE")
    model = tiny_mistral(setting.tokenizer)
    chat = data.ChatFormat(setting.tokenizer)
    messages = [{"role": "user", "content": "12+34"}]
    y = data.build_sequence(chat.prompt_ids(messages), chat.reply_ids(messages, "46"), 32, 48)
    batch = data.collate([y, y])  # y' = y
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = loss.sequence_logps(logits, batch["labels"])  # (2,) log p_θ(y|x), log p_θ(y'|x)
    # the opponent's log-probs are constants: any values, here a margin far from 0
    losses, _, _ = loss.spin_loss(logps[:1], logps[1:], torch.tensor([-4.0]),
                                  torch.tensor([-5.0]), beta=1.0)
    losses.sum().backward()
    largest = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    assert gradient == pytest.approx(largest, abs=HAND), "the gradient when y' = y"
    # y' = y when the opponent's draw and the human's draw from p_data give the same form
    p_data = torch.tensor(list(data.toy_p_data("12+34").values()), dtype=torch.float64)
    assert share == pytest.approx((p_data ** 2).sum().item(), abs=HAND), "the share wasted"


# Exercise 5: Theorem 5.4 across λ, on the tabular policy of tests/test_theory.py.
@functools.cache
def exact_steps(loss_type="logistic") -> dict[float, torch.Tensor]:
    """p_{t+1} = argmin L_SPIN(·, θ_t), minimized exactly, for several λ."""
    return {beta: minimize(P_T, P_DATA, beta, loss_type) for beta in (0.5, 1.0, 2.0, 3.0, 4.0)}


def show(steps: dict) -> None:
    """The five responses' probabilities before and after one step (pytest -s shows it)."""
    print("\n" + " " * 8 + "".join(f"{f'y{i + 1}':>8}" for i in range(len(P_T))) + "  TV to p_data")
    rows = [("p_t", P_T), ("p_data", P_DATA)]
    rows += [(f"λ = {beta:g}", steps[beta]) for beta in (0.5, 1.0, 2.0, 4.0)]
    for name, p in rows:
        print(f"{name:8}" + "".join(f"{x:8.3f}" for x in p.tolist()) + f"{tv(p, P_DATA):14.3f}")


def test_exercise_5_theorem_5_4_across_lambda(answers, setting):
    lands, closer, order = given(answers, "EX5_LAMBDA_1", "EX5_CLOSER", "EX5_ORDER_AT_HALF")
    steps = exact_steps()
    show(steps)
    landed = ("p_data" if tv(steps[1.0], P_DATA) < 1e-6 else "p_t" if tv(steps[1.0], P_T) < 1e-6
              else "between p_t and p_data")  # 1e-6: L-BFGS's distance to the exact minimizer
    assert lands == landed, "where λ = 1 lands"
    assert closer == min((2, 4), key=lambda beta: tv(steps[float(beta)], P_DATA)), "λ = 2 or 4"
    after, before = (steps[0.5] / P_DATA).argsort(), (P_T / P_DATA).argsort()
    orders = {"same": before, "reversed": before.flip(0)}  # P_T / P_DATA has no ties
    assert order in orders and torch.equal(after, orders[order]), "the order at λ = 0.5"


# Exercise 6: the data of iteration t − 1.
def pairs_per_iteration(argv: list[str]) -> list[int]:
    """The pairs each iteration of `python spin.py *argv` trains on: its prompts as
    machinery/prepare.py selects them, and in iteration t ≥ 1 those of t − 1 when mixed in.
    A run writes the same (test_a_toy_run_trains_on_the_pairs_and_steps_that_the_checks_count)."""
    args = spin.parse_args(argv)
    rows = data.load_rows(args.dataset, args.dataset_split, args.turn)
    rows, _ = evaluation.heldout_rows(rows, args)
    n = min(len(rows), args.max_samples or len(rows))  # prepare: data.subsample(rows, max_samples)
    return [n] + [2 * n if args.mix_previous_iteration else n] * (args.iters - 1)


def test_exercise_6_the_data_of_the_previous_iteration(answers, setting):
    mixed, unmixed = given(answers, "EX6_PAIRS_MIXED", "EX6_PAIRS_UNMIXED")
    assert mixed == pairs_per_iteration(["--iters", "2", "--output_dir", "runs/mix"])[1]
    assert unmixed == pairs_per_iteration(["--iters", "2", "--no-mix_previous_iteration",
                                           "--output_dir", "runs/nomix"])[1]


# Exercise 7: greedy instead of sampled opponents.
@pytest.fixture(scope="session")
def greedy_and_sampled(small_sft_model) -> tuple[dict, int]:
    """The mean log p_θt(y'|x) of greedy and of sampled y' on 50 toy prompts, and the number of
    distinct greedy replies to one prompt asked 10 times."""
    tokenizer, model = models.load_model(str(small_sft_model))
    chat = data.ChatFormat(tokenizer)
    prompts = [chat.prompt_ids(row["messages"]) for row in data.toy_rows("train")[:50]]
    args = spin.parse_args(["--model", str(small_sft_model), "--dataset", "toy", "--quiet"])
    mean_logp = {}
    for how in ("greedy", "sampled"):
        sampling = generate.Sampling(max_new_tokens=12, do_sample=how == "sampled")
        replies = generate.generate(model, tokenizer, prompts, sampling, seed=0)
        pairs = [{"prompt_ids": x, "real_ids": r["generated_ids"],
                  "generated_ids": r["generated_ids"]} for x, r in zip(prompts, replies)]
        spin.opponent_logps(model, pairs, args)
        mean_logp[how] = sum(p["opponent_generated_logp"] for p in pairs) / len(pairs)
    greedy = generate.Sampling(max_new_tokens=12, do_sample=False)
    again = generate.generate(model, tokenizer, [prompts[0]] * 10, greedy, seed=0)
    return mean_logp, len({tuple(r["generated_ids"]) for r in again})


def test_exercise_7_greedy_instead_of_sampled_opponents(answers, setting):
    likelier, distinct = given(answers, "EX7_LIKELIER", "EX7_GREEDY_DISTINCT")
    mean_logp, greedy_distinct = setting.greedy_and_sampled
    assert likelier == max(mean_logp, key=mean_logp.get), mean_logp
    assert distinct == greedy_distinct, "distinct greedy replies to one prompt"


# Exercise 8: a new convex ℓ, the exponential loss ℓ(t) = e^{−t}.
def exponential(t):
    return torch.exp(-t)


def test_exercise_8_the_exponential_loss(answers, setting):
    at_fixed_point, exponent = given(answers, "EX8_LOSS_AT_FIXED_POINT", "EX8_EXPONENT")
    logits = P_DATA.log().clone().requires_grad_(True)  # θ = θ_t with p_θt = p_data
    fixed_point_loss = tabular_spin_loss(logits, P_DATA, P_DATA, beta=0.1, loss_type=exponential)
    fixed_point_loss.backward()
    assert logits.grad.abs().max().item() < 1e-12  # Theorem 5.2 holds: a stationary point
    assert at_fixed_point == pytest.approx(fixed_point_loss.item(), abs=HAND), "L_SPIN there"
    # log p_{t+1}/p_t = (k/λ)·log(p_data/p_t) + const: k is λ times the slope of a line fit
    x = (P_DATA / P_T).log()
    for beta, p_next in exact_steps(exponential).items():
        y = (p_next / P_T).log()
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        assert exponent == pytest.approx(beta * slope.item(), abs=HAND), f"k at λ = {beta}"


# Exercise 9: why the first loss is exactly log 2, on models that have dropout.
def gpt2_with_dropout(tokenizer):
    """A small random GPT-2 with GPT2Config's default dropout: 0.1 on the embeddings, on the
    attention weights and on each residual branch, all nn.Dropout modules."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    return GPT2LMHeadModel(config)


def mistral_with_attention_dropout(tokenizer):
    """The toy's Mistral with attention_dropout 0.1 in its config: the attention layers apply that
    rate themselves in training mode (there is no nn.Dropout in Mistral). The toy's own is 0."""
    model = tiny_mistral(tokenizer)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    return model


def first_step(model, tokenizer, iteration_dir) -> tuple[float, set]:
    """One SPIN update through spin.train on 8 toy pairs, θ = θ_t at its start: the first step's
    loss, and the modes (model.training) that the opponent's log-prob pass ran in."""
    pairs = toy_pairs(tokenizer)
    args = toy_args("--per_device_train_batch_size", len(pairs), "--num_train_epochs", 1)
    modes = set()
    hook = model.register_forward_pre_hook(lambda module, inputs: modes.add(module.training))
    spin.opponent_logps(model, pairs, args)
    hook.remove()
    iteration_dir.mkdir(parents=True)
    torch.manual_seed(0)  # dropout's masks, where dropout is on
    history, _ = spin.train(model, pairs, learning_rate=1e-4, iteration=0, args=args,
                            iteration_dir=iteration_dir)
    return history[0]["loss"], modes


def test_exercise_9_the_first_loss_is_log_2(answers, setting):
    first_loss, function, mode = given(
        answers, "EX9_FIRST_LOSS", "EX9_FUNCTION", "EX9_OPPONENT_MODE")
    assert first_loss == pytest.approx(math.log(2), abs=HAND), "the first loss"
    for make in (gpt2_with_dropout, mistral_with_attention_dropout):
        loss_at_theta_t, modes = first_step(make(setting.tokenizer), setting.tokenizer,
                                            setting.tmp_path / make.__name__)
        assert modes == {mode == "train"}, f"the opponent's pass ran in training mode: {modes}"
        # 1e-5: the policy's float32 sums against the opponent's, from batches made alike
        assert loss_at_theta_t == pytest.approx(math.log(2), abs=1e-5), make.__name__
    assert callable(getattr(spin, str(function), None)), f"spin.py has no function {function!r}"
    with setting.monkeypatch.context() as patch:
        patch.setattr(spin, function, lambda *args, **kwargs: None)  # as if it were removed
        try:
            without, _ = first_step(gpt2_with_dropout(setting.tokenizer), setting.tokenizer,
                                    setting.tmp_path / "without")
        except Exception as error:
            raise AssertionError(f"without spin.{function} training does not run") from error
    assert abs(without - math.log(2)) > 1e-3, f"without spin.{function} the first loss is log 2"


# Exercise 10: two iterations, read as data.
@pytest.fixture(scope="session")
def two_iterations(tokenizer, tmp_path_factory) -> list[list[dict]]:
    """Algorithm 1's loop twice on fixed toy pairs (no sampling), as spin.main runs it: the
    opponent's log-probs of the model as it stands, then training; each step's metrics."""
    tmp_path = tmp_path_factory.mktemp("two-iterations")
    model, pairs = tiny_mistral(tokenizer), toy_pairs(tokenizer)
    args = toy_args("--per_device_train_batch_size", 4, "--num_train_epochs", 1)
    history = []
    for t in (0, 1):
        spin.opponent_logps(model, pairs, args)  # θ_t: the model as iteration t − 1 left it
        (tmp_path / f"iter{t}").mkdir()
        steps, _ = spin.train(model, pairs, learning_rate=1e-3, iteration=t, args=args,
                              iteration_dir=tmp_path / f"iter{t}")
        history.append(steps)
    return history


def dummy_pairs(n: int) -> list[dict]:
    return [{"prompt_ids": [1], "real_ids": [2], "generated_ids": [3]}] * n


def test_exercise_10_two_iterations_read_as_data(answers, setting):
    margin, steps_0, steps_1 = given(answers, "EX10_FIRST_MARGIN", "EX10_STEPS_0", "EX10_STEPS_1")
    history = setting.two_iterations
    assert abs(history[0][-1]["margin"]) > 1e-3  # iteration 0 moved the policy away from θ_0
    assert margin == pytest.approx(history[1][0]["margin"], abs=HAND), "iteration 1's first margin"
    argv = ["--iters", "2", "--output_dir", "runs/two"]
    args = spin.parse_args(argv)
    steps = [len(list(spin.batches(dummy_pairs(n), t, args)))
             for t, n in enumerate(pairs_per_iteration(argv))]
    assert [steps_0, steps_1] == steps, "optimizer steps of iterations 0 and 1"


CHECKS = {1: test_exercise_1_eq_4_7_by_hand,
          2: test_exercise_2_the_hinge_has_its_value_and_its_gradient,
          4: test_exercise_4_identical_answers_teach_nothing,
          5: test_exercise_5_theorem_5_4_across_lambda,
          6: test_exercise_6_the_data_of_the_previous_iteration,
          7: test_exercise_7_greedy_instead_of_sampled_opponents,
          8: test_exercise_8_the_exponential_loss,
          9: test_exercise_9_the_first_loss_is_log_2,
          10: test_exercise_10_two_iterations_read_as_data}

# A wrong value for each answer (a right one of a neighbouring exercise, a sign, a slip).
WRONG = {"EX1_REAL_REWARD": -0.5, "EX1_GENERATED_REWARD": 1.0, "EX1_MARGIN": -0.5,
         "EX1_LOSS": math.log(1 + math.exp(1.5)),
         "EX4_GRADIENT": 0.5, "EX4_WASTED_SHARE": 0.5,
         "EX5_LAMBDA_1": "between p_t and p_data", "EX5_CLOSER": 4, "EX5_ORDER_AT_HALF": "same",
         "EX6_PAIRS_MIXED": 2000, "EX6_PAIRS_UNMIXED": 4000,
         "EX7_LIKELIER": "sampled", "EX7_GREEDY_DISTINCT": 10,
         "EX8_LOSS_AT_FIXED_POINT": math.log(2), "EX8_EXPONENT": 1.0,
         "EX9_FIRST_LOSS": 1.0, "EX9_FUNCTION": "rmsprop", "EX9_OPPONENT_MODE": "train",
         "EX10_FIRST_MARGIN": 1.0, "EX10_STEPS_0": 32, "EX10_STEPS_1": 128}


def solutions():
    return importlib.import_module("docs.solutions.answers")


def names(module) -> list[str]:
    return [name for name in vars(module) if name.startswith("EX")]


def with_answers(**changed):
    """The solutions with some answers changed."""
    return types.SimpleNamespace(**{**{n: getattr(solutions(), n) for n in names(solutions())},
                                    **changed})


def test_the_answers_file_holds_the_solutions_names_and_the_exercises_name_each(answers):
    assert names(answers) == names(solutions()) == list(WRONG)
    text = (ROOT / "docs" / "exercises.md").read_text()
    assert [name for name in WRONG if f"`{name}`" not in text] == []


@pytest.mark.parametrize("number", sorted(CHECKS))
def test_the_solutions_pass_the_check(number, setting):
    CHECKS[number](solutions(), setting)


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_answer_fails_its_check(name, setting):
    number = int(name[2:].split("_")[0])
    with pytest.raises(AssertionError):
        CHECKS[number](with_answers(**{name: WRONG[name]}), setting)


@pytest.mark.parametrize("number", sorted(set(CHECKS) - {2}))
def test_an_unanswered_exercise_is_skipped(number, setting):
    with pytest.raises(pytest.skip.Exception):
        CHECKS[number](with_answers(**dict.fromkeys(names(solutions()))), setting)


def test_dropout_left_on_in_training_fails_the_check_of_exercise_9(setting, monkeypatch):
    monkeypatch.setattr(spin, "disable_dropout", lambda model: None)
    with pytest.raises(AssertionError, match="gpt2_with_dropout"):
        CHECKS[9](solutions(), setting)


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["--mix_previous_iteration", "--no-mix_previous_iteration"])
def test_a_toy_run_trains_on_the_pairs_and_steps_that_the_checks_count(small_sft_model, tmp_path,
                                                                        mix):
    """What the checks of exercises 6 and 10 compute from the flags, a run of spin.py does."""
    argv = toy_run(small_sft_model, tmp_path / "run", "--max_samples", 60, "--iters", 2, mix,
                   "--per_device_train_batch_size", 30)
    spin.main(argv)
    rows = read_jsonl(tmp_path / "run" / "iterations.jsonl")
    mixed = mix == "--mix_previous_iteration"
    assert [r["pairs"] for r in rows] == pairs_per_iteration(argv) == [60, 120 if mixed else 60]
    args = spin.parse_args(argv)
    steps = [len(read_jsonl(tmp_path / "run" / f"iter{t}" / "metrics.jsonl")) for t in (0, 1)]
    assert steps == [len(list(spin.batches(dummy_pairs(n), t, args)))
                     for t, n in enumerate(pairs_per_iteration(argv))]
