"""log p(y|x) of a causal LM on a collated batch, with logits computed at response positions only.

A model's forward computes (B, T, V) logits: every position, every vocabulary entry. SPIN needs
them only where a response token is predicted (loss.sequence_logps drops the rest). Here the
language-model head is given only those positions' hidden states, through a forward pre-hook on
the model's output embedding, so prompt and padding positions never get logits at all:

    hidden (B, T, H)  --select N response positions-->  (1, N, H)  --lm_head-->  (1, N, V)

The model's own forward still runs the head (so DeepSpeed ZeRO-3 gathers its weights as usual, and
whatever a model does after the head, such as Gemma's soft-capping, still happens). The values are
those of the full forward; only the work and memory of the other positions are gone.
"""
import torch

from loss import IGNORE_INDEX, response_logps


def batch_logps(model, batch: dict, bf16: bool = False) -> torch.Tensor:
    """(B,) log p(y|x) for a batch from data.collate (input_ids, attention_mask, labels)."""
    labels = batch["labels"]  # (B, T)
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): the positions whose next token is a response token
    positions = torch.nn.functional.pad(mask, (0, 1))  # (B, T): position i predicts token i + 1
    head = getattr(model, "module", model).get_output_embeddings()  # a DeepSpeed engine wraps the model

    def only_response_positions(module, inputs):
        hidden = inputs[0]  # (B, T, H)
        return (hidden[positions].unsqueeze(0),) + inputs[1:]  # (1, N, H)

    handle = head.register_forward_pre_hook(only_response_positions)
    try:
        with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (1, N, V)
    finally:
        handle.remove()
    # The logits are this function's own: backward may write their gradient over them.
    return response_logps(logits[0], labels[:, 1:][mask], mask, overwrite=True)  # (B,)
