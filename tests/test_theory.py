"""Theorems 5.2 and 5.4 (arXiv 2401.01335v3), checked exactly on a tabular policy.

A tabular policy is a softmax over free logits on a finite set of K responses for one prompt:
the "unrestricted function class" of the theorems. L_SPIN is then a finite sum we write out:

    L(θ) = Σ_y Σ_y' p_data(y) p_t(y') ℓ( λ·log p_θ(y)/p_t(y) − λ·log p_θ(y')/p_t(y') )
"""
import math

import pytest
import torch

from loss import spin_loss

K = 5
P_DATA = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
P_T = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)  # the opponent, far from p_data


def tabular_spin_loss(logits, p_t, p_data, beta, loss_type="logistic"):
    log_p = torch.log_softmax(logits, 0)  # (K,) log p_θ
    log_p_t = p_t.log()  # (K,)
    real = log_p.unsqueeze(1).expand(K, K).reshape(-1)  # y on rows
    generated = log_p.unsqueeze(0).expand(K, K).reshape(-1)  # y' on columns
    losses, _, _ = spin_loss(real, generated, log_p_t.unsqueeze(1).expand(K, K).reshape(-1),
                             log_p_t.unsqueeze(0).expand(K, K).reshape(-1), beta, loss_type)
    weights = (p_data.unsqueeze(1) * p_t.unsqueeze(0)).reshape(-1)  # p_data(y) p_t(y')
    return (weights * losses).sum()


def minimize(p_t, p_data, beta, loss_type="logistic"):
    """One SPIN iteration, minimized exactly: argmin over a tabular policy of L_SPIN(·, θ_t)."""
    logits = p_t.log().clone().requires_grad_(True)  # start at θ = θ_t
    optimizer = torch.optim.LBFGS([logits], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = tabular_spin_loss(logits, p_t, p_data, beta, loss_type)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return torch.softmax(logits.detach(), 0)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0, 5.0])
def test_theorem_5_4_the_minimizer_is_p_t_times_ratio_to_the_one_over_lambda(beta):
    p_next = minimize(P_T, P_DATA, beta)
    expected = P_T * (P_DATA / P_T) ** (1 / beta)
    expected = expected / expected.sum()
    assert p_next.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_theorem_5_4_with_lambda_1_lands_on_p_data_in_one_step():
    assert minimize(P_T, P_DATA, 1.0).tolist() == pytest.approx(P_DATA.tolist(), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["logistic", "hinge"])
def test_theorem_5_2_p_data_is_a_fixed_point_with_loss_l0(loss_type):
    logits = P_DATA.log().clone().requires_grad_(True)  # θ_t with p_θt = p_data
    loss = tabular_spin_loss(logits, P_DATA, P_DATA, beta=0.1, loss_type=loss_type)
    loss.backward()
    l0 = math.log(2) if loss_type == "logistic" else 1.0  # ℓ(0)
    assert loss.item() == pytest.approx(l0, abs=1e-12)
    if loss_type == "logistic":  # hinge is not differentiable at 0; check its value only
        assert logits.grad.abs().max().item() < 1e-12
    # and no other policy does better: L(θ, θ_t) ≥ ℓ(0)
    torch.manual_seed(0)
    for _ in range(20):
        other = torch.randn(K, dtype=torch.float64)
        assert tabular_spin_loss(other, P_DATA, P_DATA, 0.1, loss_type).item() >= l0 - 1e-12


def test_theorem_5_2_necessity_theta_t_is_not_optimal_when_p_t_differs_from_p_data():
    logits = P_T.log().clone().requires_grad_(True)
    loss = tabular_spin_loss(logits, P_T, P_DATA, beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)  # θ = θ_t always gives ℓ(0)...
    assert logits.grad.abs().max().item() > 1e-2  # ...but it is not a stationary point
    assert tabular_spin_loss(torch.log(minimize(P_T, P_DATA, 1.0)), P_T, P_DATA, 1.0).item() < math.log(2) - 1e-3
