"""loss.py: the log-prob sum and Eq. 4.7, against computations written out by hand."""
import math

import pytest
import torch

from conftest import tiny_mistral
from loss import IGNORE_INDEX, sequence_logps, spin_loss


def test_sequence_logps_equals_a_naive_per_token_loop(tokenizer):
    model = tiny_mistral(tokenizer)
    torch.manual_seed(1)
    input_ids = torch.randint(7, len(tokenizer), (3, 9))  # (B, T)
    labels = input_ids.clone()
    labels[0, :4] = IGNORE_INDEX  # prompt of 4 tokens
    labels[1, :2] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX  # and 2 padding positions
    labels[2, :6] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        got = sequence_logps(logits, labels)
        expected = []
        for b in range(3):
            total = 0.0
            for t in range(1, 9):  # token t given tokens < t
                if labels[b, t] != IGNORE_INDEX:
                    prefix_logits = model(input_ids=input_ids[b: b + 1, :t]).logits[0, -1]
                    total += torch.log_softmax(prefix_logits.double(), -1)[input_ids[b, t]].item()
            expected.append(total)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_sequence_logps_masks_prompt_and_padding():
    logits = torch.zeros(1, 4, 5)  # uniform over V = 5
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, IGNORE_INDEX]])
    assert sequence_logps(logits, labels).item() == pytest.approx(2 * math.log(1 / 5))


def test_logistic_loss_on_hand_computed_inputs():
    # λ = 0.5; real log-ratio = (-1) - (-2) = 1; generated log-ratio = (-3) - (-1) = -2; t = 0.5 * 3 = 1.5
    losses, real_rewards, generated_rewards = spin_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert real_rewards.item() == pytest.approx(0.5)
    assert generated_rewards.item() == pytest.approx(-1.0)


def test_hinge_loss_on_hand_computed_inputs():
    policy_real = torch.tensor([-1.0, -1.0])
    policy_generated = torch.tensor([-3.0, -1.0])
    opponent = torch.tensor([-1.0, -1.0])
    losses, _, _ = spin_loss(policy_real, policy_generated, opponent, opponent, beta=0.25, loss_type="hinge")
    # t = 0.25 * (0 - (-2)) = 0.5 -> max(0, 0.5) = 0.5; t = 0 -> 1
    assert losses.tolist() == pytest.approx([0.5, 1.0])
    losses, _, _ = spin_loss(torch.tensor([3.0]), torch.tensor([-3.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                             beta=1.0, loss_type="hinge")
    assert losses.item() == 0.0  # t = 6 ≥ 1


def test_policy_equal_to_opponent_gives_log2_and_zero_rewards():
    logps = torch.tensor([-5.0, -0.3, -12.0])
    losses, real_rewards, generated_rewards = spin_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert real_rewards.abs().max() == 0 and generated_rewards.abs().max() == 0


def test_identical_real_and_generated_give_zero_gradient(tokenizer):
    model = tiny_mistral(tokenizer)
    input_ids = torch.randint(7, len(tokenizer), (1, 6))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    logits = model(input_ids=torch.cat([input_ids, input_ids])).logits  # real and generated identical
    logps = sequence_logps(logits, torch.cat([labels, labels]))
    losses, _, _ = spin_loss(logps[:1], logps[1:], torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1)
    losses.sum().backward()
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-7


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, loss_type="sigmoid")
