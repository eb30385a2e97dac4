"""Packed rows and length-grouped steps: the fast layout of a forward pass's sequences.

A (prompt, response) pair of id lists becomes one sequence (data.build_sequence: input ids, and
labels that are IGNORE_INDEX on the prompt). A forward pass gets several sequences either

  - padded (data.collate): a row per sequence, right-padded to the longest, with an attention
    mask; or
  - packed (pack, --padding_free, the default where the model allows it: logps.PADDING_FREE_MODELS):
    the sequences end to end in fewer, fuller rows, their position ids restarting at 0 and no
    attention mask, so that transformers keeps each sequence to itself. No padding between them,
    the same log-probs to float32 rounding.

Which pairs share an optimizer step: a seeded shuffle (spin.batches), or with --group_by_length
pairs of similar length (grouped_by_length), which pads less where sequences cannot be packed.
"""
import torch

import data
from loss import IGNORE_INDEX


def pack(sequences: list[dict], width: int | None = None, pad_token_id: int = 0) -> dict:
    """A padding-free batch: the sequences laid end to end in rows of `width` tokens, first fit,
    longest first; each sequence restarts its position ids at 0, and whatever is left of a row is
    one more segment, of padding. With no attention mask, transformers reads the sequences off
    the position ids (a new one wherever they do not go up by 1) and lets a token attend only to
    earlier tokens of its own sequence: the same log-probs as collate's padded rows, on fewer,
    fuller rows. The default width is fullest_width's: the longest sequence's, or a little more
    where that saves rows. Returns input_ids, labels, position_ids and sequence (R, width): which
    of `sequences` a token belongs to, -1 on padding."""
    lengths = [len(s["input_ids"]) for s in sequences]
    width = width or fullest_width(lengths)
    rows = first_fit(lengths, width)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (R, W)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, W)
    sequence = torch.full((len(rows), width), -1, dtype=torch.long)  # (R, W)
    position_ids = torch.empty((len(rows), width), dtype=torch.long)  # (R, W)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i]["input_ids"])
            input_ids[r, start:start + n] = torch.tensor(sequences[i]["input_ids"])
            # a first label is never scored
            labels[r, start + 1:start + n] = torch.tensor(sequences[i]["labels"][1:])
            sequence[r, start:start + n] = i
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(width - start)  # the padding: a segment of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "sequence": sequence}


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """FlashAttention-2's varlen arguments for a packed batch of ONE row (pack(..., width=total)):
    where each sequence starts (cu_seq_lens, int32) and the longest length, computed here on the
    host before the batch moves to the GPU. Without them transformers finds the sequences in the
    position ids again in every attention layer, each time with a device-to-host copy
    (modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids; the same numbers)."""
    positions = position_ids.reshape(-1)  # (W,)
    starts = (positions == 0).nonzero()[:, 0]  # (S,)
    cu_seq_lens = torch.cat([starts, torch.tensor([positions.numel()])]).to(torch.int32)  # (S + 1,)
    longest = int(cu_seq_lens.diff().max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of `lengths` in rows of at most `width` tokens: longest first, each into the first
    row with room."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def fullest_width(lengths: list[int]) -> int:
    """The row width for pack(): the longest length, or a little more where that saves rows.
    first_fit at the longest length needs R rows; for each smaller number of rows the narrowest
    width that fits them (a binary search up from sum / rows) is tried, and the width with the
    fewest slots (rows × width) wins, the narrower on a tie. Not wider than that: SDPA's
    attention is dense within a row, and rows twice as wide measured slower
    (benchmarks/padding.py, docs/performance.md)."""
    longest, total = max(lengths), sum(lengths)
    best = (len(first_fit(lengths, longest)) * longest, longest)
    for count in range(-(-total // longest), best[0] // longest):
        low, high = max(longest, -(-total // count)), total
        while low < high:  # the narrowest width that first_fit fits in `count` rows
            middle = (low + high) // 2
            fits = len(first_fit(lengths, middle)) <= count
            low, high = (low, middle) if fits else (middle + 1, high)
        best = min(best, (count * low, low))
    return best[1]


# steps' worth of shuffled pairs sorted together (Hugging Face Trainer's megabatch is 50 batches)
GROUP_WINDOW = 50


def grouped_by_length(order: list[int], lengths: list[int], size: int, generator) -> list[int]:
    """The shuffled `order`, cut into windows of GROUP_WINDOW steps; each window sorted by length
    and cut into steps of `size` pairs, whose order within the window is shuffled again. A batch
    is padded to its longest sequence, so similar lengths in a step leave little padding; which
    pairs share a step is still random from iteration to iteration and epoch to epoch
    (docs/differences.md)."""
    out = []
    for start in range(0, len(order), GROUP_WINDOW * size):
        window = sorted(order[start:start + GROUP_WINDOW * size], key=lambda i: -lengths[i])
        steps = [window[k:k + size] for k in range(0, len(window), size)]
        out += [i for k in torch.randperm(len(steps), generator=generator).tolist()
                for i in steps[k]]
    return out


def pair_length(pair: dict, max_prompt_length: int, max_length: int) -> int:
    """Tokens of a pair's longer sequence, prompt + y or prompt + y', as build_sequence cuts
    them."""
    prompt = len(data.cut_prompt(pair["prompt_ids"], max_prompt_length))
    return min(max_length, prompt + max(len(pair["real_ids"]), len(pair["generated_ids"])))
