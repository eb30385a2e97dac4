"""log p(y|x) of a causal LM on a batch of sequences, without the (B, T, V) logits a forward makes.

A model's forward computes (B, T, V) logits: every position, every vocabulary entry. SPIN needs
only log p(target) where a response token is predicted (loss.sequence_logps drops the rest). Here
the language-model head is given only those positions' hidden states, through a forward pre-hook
on the model's output embedding, so prompt and padding positions never get logits at all:

    hidden (B, T, H)  --select N response positions-->  (1, N, H)  --lm_head-->  ...

and then, on models whose head is a plain linear layer whose logits the model returns untouched
(FUSED_HEAD_MODELS), the head itself computes log p(target) a tile at a time (FusedTokenLogps):
the positions against a block of the vocabulary, the tile's logits made from the hidden states,
reduced in float32 to a running logsumexp and the target's logit, and dropped; backward makes
them again, tile by tile. No (N, V) tensor exists at any moment. Models that change the logits
after the head (Gemma-2's soft-capping, Cohere's logit_scale, ...) take the other path: the head
computes the (N, V) logits and TokenLogps reduces them in chunks, with its own backward.

Either way the model's own forward calls the head module, so DeepSpeed ZeRO-3 gathers the head's
weight for forward and again for backward, as for any layer, and the gradient reaches its partition
through autograd as nn.Linear's does. Every function here gives the numbers of
loss.sequence_logps, the plain definition, to rounding (tests/test_logps.py, tests/test_zero3.py).
SPIN_FUSED_HEAD=0 turns the fused path off (benchmarks, comparisons).

The batch's rows are either padded, one sequence each (data.collate), or packed, several
sequences end to end with no padding between them (batching.pack, Scoring.padding_free) on the
model types in PADDING_FREE_MODELS.
"""
import os
from dataclasses import dataclass

import torch

import data
from machinery import batching
from loss import IGNORE_INDEX, sequence_logps


@dataclass(frozen=True)
class Scoring:
    """How a run scores log p(y|x), the same for the opponent pass, training and evaluation: the
    cuts of data.build_sequence, bf16 autocast, packing, and which path computes the log-probs.
    Built once from the run's flags (Scoring.of_run), as generate.Sampling is for sampling."""
    max_prompt_length: int  # --max_prompt_length: the prompt keeps its last tokens
    max_length: int  # --max_length: prompt + response, the response cut at its end
    bf16: bool = False  # --bf16: forward under bf16 autocast; log-probs summed in float32
    padding_free: bool = False  # --padding_free: sequences packed without padding (batching.pack)
    fast: bool = True  # --fast_logps; False: loss.sequence_logps on the (B, T, V) logits

    @classmethod
    def of_run(cls, args) -> "Scoring":
        """The scoring settings of a run's flags."""
        return cls(max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                   bf16=args.bf16, padding_free=args.padding_free, fast=args.fast_logps)


def score(model, prompts: list[list[int]], responses: list[list[int]],
          scoring: Scoring) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) log p(response|prompt) of a batch of id lists, cut as in training (data.build_sequence),
    and (B,) the number of response tokens scored: the one scoring path of the opponent pass,
    training and evaluation. scoring.fast=False (--no-fast_logps): the textbook path,
    loss.sequence_logps on the model's (B, T, V) logits of padded rows, the definition as a reader
    reads it. scoring.fast=True: the head computes only response positions (batch_logps), and with
    padding_free the sequences are packed into rows without padding (batching.pack) where the model
    reads sequences off position ids (packs(model)); otherwise padded. Both give the same numbers
    to float rounding (tests)."""
    device = next(model.parameters()).device
    sequences = [data.build_sequence(p, r, scoring.max_prompt_length, scoring.max_length)
                 for p, r in zip(prompts, responses)]
    tokens = torch.tensor([sum(label != IGNORE_INDEX for label in s["labels"][1:])
                           for s in sequences], device=device)
    if not scoring.fast:
        batch = {k: v.to(device) for k, v in data.collate(sequences).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=scoring.bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits  # (B, T, V)
        return sequence_logps(logits, batch["labels"]), tokens  # (B,), (B,)
    if scoring.padding_free and packs(model):
        # FlashAttention finds the sequences in the position ids of a batch of ONE row only
        # (varlen); SDPA and eager get a block-diagonal mask per row, rows about as wide as the
        # longest sequence (batching.fullest_width: attention is dense within a row).
        one_row = str(getattr(_config(model), "_attn_implementation", "")).startswith("flash")
        batch = batching.pack(sequences, width=sum(len(s["input_ids"]) for s in sequences)
                              if one_row else None)
        if one_row:
            batch.update(batching.varlen_kwargs(batch["position_ids"]))
    else:
        batch = data.collate(sequences)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch_logps(model, batch, scoring.bf16), tokens  # (B,), (B,)


@torch.no_grad()
def score_all(model, prompts: list[list[int]], responses: list[list[int]], scoring: Scoring, *,
              batch_size: int, desc: str = "score",
              progress: bool = False) -> list[tuple[float, int]]:
    """score() in batches of batch_size, without gradients: [(log p(response|prompt), response
    tokens scored)] in the order given (held-out evaluation scores through it)."""
    from tqdm import tqdm

    model.eval()
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True):
        logps, tokens = score(model, prompts[start:start + batch_size],
                              responses[start:start + batch_size], scoring)  # (b,), (b,)
        out += zip(logps.tolist(), tokens.tolist())
    return out


# Model types whose forward returns the head's logits as they are (transformers 5.24's modeling
# files: nothing between `logits = self.lm_head(hidden_states)` and the return but the optional
# loss).
FUSED_HEAD_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                     "phi3", "gemma", "olmo2", "smollm3"}


def _config(model):
    # a DeepSpeed engine wraps the model
    return getattr(getattr(model, "module", model), "config", None)


def fused_head(model) -> bool:
    """Whether batch_logps computes log p(target) inside the head (FusedTokenLogps) for this
    model."""
    model_type = getattr(_config(model), "model_type", None)
    return os.environ.get("SPIN_FUSED_HEAD", "1") != "0" and model_type in FUSED_HEAD_MODELS


# Model types whose attention mask transformers 5.24 builds with masking_utils (which finds packed
# sequences in the position ids when no attention mask is given) and whose positions come from the
# position ids: packed and padded batches give the same log-probs (tests/test_logps.py checks each
# type).
PADDING_FREE_MODELS = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                       "phi3", "phi", "gemma",
                       "gemma2", "gemma3_text", "olmo2", "smollm3", "gpt2", "gpt_neox", "falcon",
                       "stablelm", "starcoder2", "granite", "cohere"}


def packs(model) -> bool:
    """Whether score() may pack this model's batches without padding (batching.pack)."""
    return getattr(_config(model), "model_type", None) in PADDING_FREE_MODELS


def batch_logps(model, batch: dict, bf16: bool = False) -> torch.Tensor:
    """(S,) log p(y|x) of the S sequences of a batch from data.collate (input_ids, attention_mask,
    labels: a sequence per row) or batching.pack (input_ids, position_ids, labels, sequence: rows of
    several sequences, which the position ids tell apart, and no attention mask)."""
    labels = batch["labels"]  # (B, T)
    # (B, T-1): the positions whose next token is a response token
    mask = labels[:, 1:] != IGNORE_INDEX
    positions = torch.nn.functional.pad(mask, (0, 1))  # (B, T): position i predicts token i + 1
    targets = labels[:, 1:][mask]  # (N,)
    # a DeepSpeed engine wraps the model
    head = getattr(model, "module", model).get_output_embeddings()
    fused = fused_head(model)
    packed = "position_ids" in batch
    key = "position_ids" if packed else "attention_mask"
    inputs = {key: batch[key]}
    # FA-2 varlen
    inputs.update({k: v for k, v in batch.items() if k.startswith(("cu_seq_lens", "max_length"))})

    def only_response_positions(module, inputs):
        hidden = inputs[0]  # (B, T, H)
        return (hidden[positions].unsqueeze(0),) + inputs[1:]  # (1, N, H)

    def log_p_target(hidden):  # the head's forward, for this call: (1, N, H) -> (1, N, 1)
        token_logps = FusedTokenLogps.apply(hidden[0], head.weight, head.bias, targets, head)
        return token_logps[None, :, None]

    handle = head.register_forward_pre_hook(only_response_positions)
    if fused:
        # an instance attribute: the module's hooks (ZeRO-3's) still run around it
        head.forward = log_p_target
    try:
        with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
            # no KV cache to fill
            out = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    finally:
        handle.remove()
        if fused:
            del head.forward
    # (N,) log p of each response token; unfused, from logits that are this function's own (backward
    # may write their gradient over them).
    token_logps = out[0, :, 0].float() if fused else TokenLogps.apply(out[0], targets, True)
    if packed:
        owner = batch["sequence"][:, 1:][mask]  # (N,): the sequence each response token belongs to
        # (S,)
        sums = torch.zeros(int(batch["sequence"].max()) + 1, dtype=torch.float32,
                           device=labels.device)
        return sums.index_add(0, owner, token_logps)
    per_position = torch.zeros(mask.shape, dtype=torch.float32, device=labels.device)  # (B, T-1)
    return per_position.masked_scatter(mask, token_logps).sum(dim=-1)  # (B,): a row per sequence


def from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """loss.sequence_logps through the chunked path: logits (B, T, V), labels (B, T) -> (B,)
    float32."""
    logits, labels = logits[:, :-1, :], labels[:, 1:]  # position i predicts token i + 1
    mask = labels != IGNORE_INDEX  # (B, T-1) True on the N response tokens
    return response_logps(logits[mask], labels[mask], mask)  # (N, V), (N,) -> (B,)


def response_logps(response_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   overwrite: bool = False) -> torch.Tensor:
    """The same sum, from the logits of the response positions only: response_logits (N, V) and
    targets (N,) are the rows where mask (B, T-1) is True, in order. Returns (B,) float32.
    overwrite=True lets backward write the gradient into response_logits itself (one (N, V)
    tensor less at the peak): only for logits that nothing else reads afterwards."""
    token_logps = TokenLogps.apply(response_logits, targets, overwrite)  # (N,)
    # (B, T-1)
    per_position = torch.zeros(mask.shape, dtype=torch.float32, device=response_logits.device)
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
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor,
                overwrite: bool = False) -> torch.Tensor:
        rows = max(1, TokenLogps.CHUNK_BYTES // (4 * logits.shape[-1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        token_logps = torch.empty_like(lse)  # (N,)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start:start + rows].float()  # (rows, V)
            lse[start:start + rows] = chunk.logsumexp(dim=-1)
            picked = chunk.gather(1, targets[start:start + rows, None]).squeeze(1)
            token_logps[start:start + rows] = picked - lse[start:start + rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows, ctx.overwrite, ctx.consumed = rows, overwrite, False
        return token_logps

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (N,)
        if ctx.consumed:
            raise RuntimeError("TokenLogps(overwrite=True): its logits were overwritten by the "
                               "first backward")
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


class FusedTokenLogps(torch.autograd.Function):
    """log p(target) for N hidden states (N, H) through a linear head (weight (V, H), bias (V,) or
    None), a tile of float32 logits at a time: the head and the log-softmax fused, so that the (N,
    V) logits never exist. The vocabulary is taken a block of rows of the weight at a time (every
    position against a block, as many positions at once as CHUNK_BYTES of float32 logits allow), the
    logsumexp carried from block to block; forward keeps the hidden states and logsumexp (N,).
    Backward makes each tile's logits again and gives, with d = g·(onehot(target) − softmax):

        dL/dhidden = Σ_blocks d @ W_block    dL/dW_block = dᵀ @ hidden    dL/dbias_block = Σ_rows d

    so each block of the weight's gradient is made once, in the weight's dtype, with no (V, H)
    float32 accumulator; each block of the weight is read once per pass while all positions fit
    in a tile. The weight is read from the head module when backward runs, not saved by forward:
    under DeepSpeed ZeRO-3 it is gathered only while the module's forward or backward runs. The
    matmuls run in autocast's dtype when autocast is on (bf16, like nn.Linear's), in forward AND
    in backward (which runs outside autocast), else in the hidden states' dtype; the softmax in
    float32."""

    CHUNK_BYTES = 32 * 2**20  # float32 logits alive at once (a tile)
    # vocabulary entries per block at least, however many positions: rows are cut instead
    MIN_BLOCK = 4096

    @staticmethod
    def tiles(n: int, v: int) -> tuple[int, int]:
        """(positions, vocabulary entries) per tile."""
        block = min(v, max(FusedTokenLogps.MIN_BLOCK, FusedTokenLogps.CHUNK_BYTES // (4 * n)))
        return max(1, min(n, FusedTokenLogps.CHUNK_BYTES // (4 * block))), block

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head):
        # The matmuls' dtype: autocast's when it is on (bf16 matmuls on fp32 weights, as
        # nn.Linear's), kept for backward, which runs outside autocast and would otherwise multiply
        # in float32.
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
        n, v = hidden.shape[0], weight.shape[0]
        rows, block = FusedTokenLogps.tiles(n, v)
        lse = torch.full((n,), -torch.inf, dtype=torch.float32, device=hidden.device)  # (N,)
        target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # (N,)
        with torch.autocast(device, enabled=False):
            for c in range(0, v, block):
                w = weight[c:c + block].to(dtype)  # (block, H)
                b = bias[c:c + block].to(dtype) if bias is not None else None
                for r in range(0, n, rows):
                    x = hidden[r:r + rows].to(dtype)  # (rows, H)
                    logits = torch.nn.functional.linear(x, w, b).float()  # (rows, block)
                    lse[r:r + rows] = torch.logaddexp(lse[r:r + rows], logits.logsumexp(dim=-1))
                    # (rows, 1), (rows, 1)
                    column, inside = _in_block(targets[r:r + rows], c, logits.shape[1])
                    picked = torch.where(inside, logits.gather(1, column), 0.0)  # (rows, 1)
                    target_logit[r:r + rows] += picked[:, 0]
        ctx.save_for_backward(hidden, targets, lse)
        ctx.head, ctx.dtype = head, dtype
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad):  # grad: (N,)
        hidden, targets, lse = ctx.saved_tensors
        weight, bias = ctx.head.weight, ctx.head.bias  # gathered now, under ZeRO-3
        dtype = ctx.dtype
        n, v = hidden.shape[0], weight.shape[0]
        rows, block = FusedTokenLogps.tiles(n, v)
        grad = grad.float()
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # (N, H)
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None  # (V, H)
        # (V,)
        grad_bias = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for c in range(0, v, block):
            w = weight[c:c + block].to(dtype)  # (block, H)
            b = bias[c:c + block].to(dtype) if bias is not None else None
            block_weight = block_bias = 0
            for r in range(0, n, rows):
                x = hidden[r:r + rows].to(dtype)  # (rows, H)
                g = grad[r:r + rows, None]  # (rows, 1)
                # (rows, block), this function's own
                d = torch.nn.functional.linear(x, w, b).float()
                d.sub_(lse[r:r + rows, None]).exp_().mul_(-g)  # in place: −g·softmax
                column, inside = _in_block(targets[r:r + rows], c, d.shape[1])
                # + g at the target: one entry per row, so a plain scatter (deterministic, no
                # atomics)
                # g·(onehot − softmax)
                d.scatter_(1, column, d.gather(1, column) + torch.where(inside, g, 0.0))
                grad_hidden[r:r + rows] += d.to(dtype) @ w
                if grad_weight is not None:
                    part = d.t().to(dtype) @ x  # (block, H)
                    # float32 over row tiles
                    block_weight = part if rows >= n else part.float() + block_weight
                if grad_bias is not None:
                    block_bias = d.sum(dim=0) + block_bias
            if grad_weight is not None:
                grad_weight[c:c + block] = block_weight
            if grad_bias is not None:
                grad_bias[c:c + block] = block_bias
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias, None, None


def _in_block(targets, start: int, width: int):
    """Where each target falls in the vocabulary block [start, start + width): its column there
    (clamped into the block when it is outside) and whether it is inside, both (rows, 1). Masks,
    not indices: no host synchronisation per tile (a .nonzero() would wait for the GPU)."""
    local = (targets - start)[:, None]  # (rows, 1)
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), inside
