"""Peak memory and time of loss.sequence_logps (response positions only, logsumexp, no (B, T, V)
log_softmax) against the naive full float32 log_softmax over (B, T, V), forward + backward, at
Mistral's vocabulary (V = 32,000) and the recipe's length (T = 1,024), half of each sequence prompt.

    python benchmarks/logprobs.py            # B=4, T=1024, V=32000, float32 and bfloat16 logits
    python benchmarks/logprobs.py --quick    # small sizes: what CI runs to check that it runs

Memory is what autograd keeps between the forward and the backward (the part that grows with
B·T·V and sets the peak of a training step): the bytes of the distinct tensors saved for backward,
counted with torch.autograd.graph.saved_tensors_hooks, beyond the logits themselves, which both paths
keep anyway. Exact and the same on any machine. Time: forward + backward on this CPU, median of
--repeats runs.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from loss import IGNORE_INDEX, sequence_logps  # noqa: E402


def naive_sequence_logps(logits, labels):
    """The textbook path: float32 log_softmax over every position and the whole vocabulary."""
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = logits.float().log_softmax(-1)  # (B, T-1, V) float32
    return (log_probs.gather(2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2) * mask).sum(-1)


def inputs(b, t, v, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.randint(v, (b, t), generator=generator)
    labels[:, : t // 2] = IGNORE_INDEX  # the prompt half
    return logits, labels


def saved_bytes(function, logits, labels) -> int:
    """Bytes of the distinct tensors autograd saves for backward, other than the logits."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() != logits.untyped_storage().data_ptr():
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(logits, labels)
    return sum(storages.values())


def seconds(function, logits, labels, repeats) -> float:
    times = []
    for _ in range(repeats):
        logits.grad = None
        started = time.perf_counter()
        function(logits, labels).sum().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    b, t, v = (2, 64, 1000) if args.quick else (4, 1024, 32000)
    repeats = 1 if args.quick else args.repeats
    print(f"B={b} T={t} V={v}, the first half of each sequence prompt; forward + backward on the CPU")
    print("| logits dtype | naive saved MiB | lean saved MiB | memory ratio | naive s | lean s | time ratio | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        logits, labels = inputs(b, t, v, getattr(torch, dtype))
        with torch.no_grad():
            diff = (sequence_logps(logits, labels) - naive_sequence_logps(logits, labels)).abs().max().item()
        memory = {name: saved_bytes(f, logits, labels) / 2**20 for name, f in
                  (("naive", naive_sequence_logps), ("lean", sequence_logps))}
        time_s = {name: seconds(f, logits, labels, repeats) for name, f in
                  (("naive", naive_sequence_logps), ("lean", sequence_logps))}
        print(f"| {dtype} | {memory['naive']:.0f} | {memory['lean']:.0f} | {memory['lean'] / memory['naive']:.2f} | "
              f"{time_s['naive']:.3f} | {time_s['lean']:.3f} | {time_s['lean'] / time_s['naive']:.2f} | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
