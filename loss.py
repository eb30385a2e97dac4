"""The SPIN objective as pure tensor functions (Eq. 4.7 of arXiv 2401.01335v3).

    L_SPIN(θ, θ_t) = E[ ℓ( λ·log p_θ(y|x)/p_θt(y|x) − λ·log p_θ(y'|x)/p_θt(y'|x) ) ]

where y is the real (human) response, y' the generated one sampled from the opponent p_θt,
p_θ the policy being trained and ℓ a monotone decreasing convex function: logistic
ℓ(t) = log(1 + e^−t) by default, hinge ℓ(t) = max(0, 1 − t) as the alternative the paper allows.

Tensors in, tensors out: no model, no configuration, no distributed calls.
Shapes: B = sequences in a batch, T = tokens per sequence (prompt + response, right-padded),
V = vocabulary size.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of prompt and padding positions: they are not part of log p(y|x)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y|x): the SUM over response tokens of log p(token | everything before it).

    logits: (B, T, V) from the model on input_ids; labels: (B, T) equal to input_ids on
    response tokens and IGNORE_INDEX elsewhere. Returns (B,) float32.

    This is the definition, written plainly; training computes the same numbers without the
    (B, T, V) log-softmax (logps.py, tested against this function).
    """
    # The logits at position i predict the token at position i + 1: drop the last logit and the
    # first label so that they line up. Reading logits[:, i] against labels[:, i] is the
    # classic bug.
    logits = logits[:, :-1, :]  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX  # (B, T-1) True on the response tokens
    logprobs = logits.float().log_softmax(dim=-1)  # (B, T-1, V) float32: bf16 sums lose digits
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T-1) a valid index where mask is False
    token_logps = logprobs.gather(2, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (token_logps * mask).sum(dim=-1)  # (B,) prompt and padding positions count 0


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    beta: float,  # λ in the paper
    loss_type="logistic",  # "logistic", "hinge", or a function ℓ of the (B,) margins
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example SPIN losses and the "rewards" λ·log p_θ/p_θt of real and generated responses.

    All inputs are (B,) sums of response log-probs (see sequence_logps). The opponent's are
    constants: it is the frozen model of the previous iteration. Returns (losses, real_rewards,
    generated_rewards), each (B,); the rewards are detached, for logging margins and accuracy.
    """
    real_logratios = policy_real_logps - opponent_real_logps  # (B,) log p_θ(y|x)/p_θt(y|x)
    generated_logratios = policy_generated_logps - opponent_generated_logps  # (B,) same for y'
    # Eq. 4.7 (arXiv 2401.01335v3): the main player f = λ·log(p_θ/p_θt) scores real above generated
    margins = beta * (real_logratios - generated_logratios)  # (B,)
    if loss_type == "logistic":
        losses = F.softplus(-margins)  # (B,) log(1 + e^−t), written stably
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - margins)  # (B,) max(0, 1 − t)
    elif callable(loss_type):  # any other monotone decreasing convex ℓ, e.g. torch.exp(-t)
        losses = loss_type(margins)  # (B,)
    else:
        raise ValueError(f"loss_type must be 'logistic', 'hinge' or a function, got {loss_type!r}")
    real_rewards = beta * real_logratios.detach()  # (B,)
    generated_rewards = beta * generated_logratios.detach()  # (B,)
    return losses, real_rewards, generated_rewards
