"""The SPIN objective as pure tensor functions (Eq. 4.7 of arXiv 2401.01335v3).

    L_SPIN(θ, θ_t) = E[ ℓ( λ·log p_θ(y|x)/p_θt(y|x) − λ·log p_θ(y'|x)/p_θt(y'|x) ) ]

where y is the real (human) response, y' the generated one sampled from the opponent p_θt,
p_θ the policy being trained and ℓ a monotone decreasing convex function: logistic
ℓ(t) = log(1 + e^−t) by default, hinge ℓ(t) = max(0, 1 − t) as the alternative the paper allows.

Tensors in, tensors out: no model, no configuration, no distributed calls.
Shapes: B = sequences in a batch, T = tokens per sequence (prompt + response, right-padded),
V = vocabulary size, N = response tokens in the batch.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of prompt and padding positions: they are not part of log p(y|x)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y|x): the SUM over response tokens of log p(token | everything before it).

    logits: (B, T, V) from the model on input_ids; labels: (B, T) equal to input_ids on
    response tokens and IGNORE_INDEX elsewhere. Returns (B,) float32.
    """
    # The logits at position i predict the token at position i + 1: drop the last logit and the
    # first label so that they line up. Reading logits[:, i] against labels[:, i] is the classic bug.
    logits = logits[:, :-1, :]  # (B, T-1, V)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX  # (B, T-1) True on the N response tokens
    # Only response positions are scored: prompt and padding never reach the softmax.
    return response_logps(logits[mask], labels[mask], mask)  # (N, V), (N,) -> (B,)


def response_logps(response_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   overwrite: bool = False) -> torch.Tensor:
    """The same sum, from the logits of the response positions only: response_logits (N, V) and
    targets (N,) are the rows where mask (B, T-1) is True, in order. Returns (B,) float32.
    overwrite=True lets backward write the gradient into response_logits itself (one (N, V)
    tensor less at the peak): only for logits that nothing else reads afterwards."""
    token_logps = TokenLogps.apply(response_logits, targets, overwrite)  # (N,)
    per_position = torch.zeros(mask.shape, dtype=torch.float32, device=response_logits.device)  # (B, T-1)
    return per_position.masked_scatter(mask, token_logps).sum(dim=-1)  # (B,)


class TokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] − logsumexp(logits) for N rows of V logits, in float32 even
    when the logits are bf16 (a sum of hundreds of bf16 log-probs loses digits).

    The memory of it: autograd's own version keeps a float32 copy of the (N, V) logits for backward.
    This one keeps only logsumexp (N,) and recomputes softmax = exp(logit − logsumexp) in
    backward, CHUNK_BYTES of float32 rows at a time; the gradient is the textbook one,
    d log p(target) / d logits = onehot(target) − softmax(logits). With overwrite, the gradient is
    written over the logits, which backward reads for the last time (a second backward through
    the same graph is refused)."""

    CHUNK_BYTES = 64 * 2**20  # float32 rows alive at once

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        rows = max(1, TokenLogps.CHUNK_BYTES // (4 * logits.shape[-1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        token_logps = torch.empty_like(lse)  # (N,)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()  # (rows, V)
            lse[start:start + rows] = chunk.logsumexp(dim=-1)
            token_logps[start:start + rows] = chunk.gather(1, targets[start:start + rows, None]).squeeze(1) \
                - lse[start:start + rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows, ctx.overwrite, ctx.consumed = rows, overwrite, False
        return token_logps

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (N,)
        if ctx.consumed:
            raise RuntimeError("TokenLogps(overwrite=True): its logits were overwritten by the first backward")
        logits, targets, lse = ctx.saved_tensors
        grad_logits = logits if ctx.overwrite else torch.empty_like(logits)  # (N, V)
        ctx.consumed = ctx.overwrite
        for start in range(0, logits.shape[0], ctx.rows):
            end = start + ctx.rows
            g = grad[start:end, None].float()  # (rows, 1)
            chunk = (logits[start:end].float() - lse[start:end, None]).exp_().mul_(-g)  # −g·softmax
            chunk.scatter_add_(1, targets[start:end, None], g)  # + g at the target
            grad_logits[start:end] = chunk  # rows [start, end) of the logits are no longer read
        return grad_logits, None, None


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
    elif callable(loss_type):  # any other monotone decreasing convex ℓ, e.g. lambda t: torch.exp(-t)
        losses = loss_type(margins)  # (B,)
    else:
        raise ValueError(f"loss_type must be 'logistic', 'hinge' or a function, got {loss_type!r}")
    real_rewards = beta * real_logratios.detach()  # (B,)
    generated_rewards = beta * generated_logratios.detach()  # (B,)
    return losses, real_rewards, generated_rewards
