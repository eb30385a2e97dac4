"""Memory and time of the project's log-prob paths against the naive one, from the model's last
hidden states to (B,) sequence log-probs, forward + backward, at Mistral's vocabulary (V = 32,000)
and Llama-3's (V = 128,256), at the recipe's length (T = 1,024), the first half of each sequence
prompt.

    naive: logits at every position (B, T, V), float32 log_softmax over all of them, gather.
    lean:  logits at response positions only (N, V) (logps.batch_logps does this inside the model's
           forward), then logps.TokenLogps: float32 logsumexp in chunks, softmax recomputed in
           backward, the gradient written over the logits. The path of models outside
           logps.FUSED_HEAD_MODELS.
    fused: logps.FusedTokenLogps, the default: the head and the log-softmax in one, a chunk of
           response positions at a time; no (N, V) tensor at all; backward makes each chunk's
           logits again.

    python -m benchmarks.logprobs            # B=4, T=1024, H=256, V=32000 and 128256; fp32 and bf16
    python -m benchmarks.logprobs --quick    # small sizes: what CI runs to check that it runs

Two memory measures, both beyond the inputs (hidden states, head weight, their gradients):
  saved:  bytes of the distinct tensors autograd keeps between forward and backward, counted with
          torch.autograd.graph.saved_tensors_hooks. Exact, the same on any machine.
  peak:   the process's peak resident memory during one forward + backward, above what it held
          before (each path in a fresh subprocess, after one warm-up pass, with Linux's peak counter
          reset; glibc returns large blocks to the OS, so this follows the live tensors). Includes
          the transient tensors: gradients of the logits, the float32 chunk, GEMM workspaces.
Time: forward + backward on this CPU, median of --repeats runs.
"""
import argparse
import json
import types
import resource
import subprocess
import sys
import time


import torch
import torch.nn.functional as F

from machinery.logps import FusedTokenLogps, response_logps
from loss import IGNORE_INDEX


def naive(hidden, weight, labels):
    """The textbook path: float32 log_softmax over every position and the whole vocabulary."""
    logits = F.linear(hidden, weight)[:, :-1]  # (B, T-1, V)
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    log_probs = logits.float().log_softmax(-1)  # (B, T-1, V) float32
    return (log_probs.gather(2, labels.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2)
            * mask).sum(-1)


def lean(hidden, weight, labels):
    """What logps.batch_logps and logps.response_logps compute, with the head written out."""
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    positions = F.pad(mask, (0, 1))  # (B, T): position i predicts token i + 1
    logits = F.linear(hidden[positions], weight)  # (N, V)
    return response_logps(logits, labels[:, 1:][mask], mask, overwrite=True)


def fused(hidden, weight, labels):
    """What logps.batch_logps computes for FUSED_HEAD_MODELS, with the head written out."""
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    positions = F.pad(mask, (0, 1))  # (B, T)
    head = types.SimpleNamespace(weight=weight, bias=None)  # what backward reads the weight from
    # (N,)
    token_logps = FusedTokenLogps.apply(hidden[positions], weight, None, labels[:, 1:][mask], head)
    return torch.zeros(mask.shape).masked_scatter(mask, token_logps).sum(-1)  # (B,)


PATHS = {"naive": naive, "lean": lean, "fused": fused}


def inputs(b, t, h, v, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=generator) / h ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(v, (b, t), generator=generator)
    labels[:, : t // 2] = IGNORE_INDEX  # the prompt half
    return hidden, weight, labels


def saved_bytes(function, hidden, weight, labels) -> int:
    """Bytes of the distinct tensors autograd saves for backward, other than the inputs."""
    inputs_ = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs_:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(hidden, weight, labels)
    return sum(storages.values())


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_worker(path: str, sizes: list[int], dtype: str) -> None:
    """In a fresh process: peak resident bytes of one forward + backward above the inputs."""
    hidden, weight, labels = inputs(*sizes, getattr(torch, dtype))
    # warm-up: first-call allocations, the gradients
    PATHS[path](hidden, weight, labels).sum().backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset the peak resident size (VmHWM) to the current one
    before = resident()
    PATHS[path](hidden, weight, labels).sum().backward()
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps(peak_kib * 1024 - before))


def peak_bytes(path: str, sizes: list[int], dtype: str) -> int:
    command = [sys.executable, "-m", __spec__.name, "--peak_worker", path, dtype, *map(str, sizes)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def seconds(function, hidden, weight, labels, repeats) -> float:
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        started = time.perf_counter()
        function(hidden, weight, labels).sum().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak_worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_worker:
        path, dtype, *sizes = args.peak_worker
        return peak_worker(path, [int(s) for s in sizes], dtype)
    b, t, h = (2, 64, 16) if args.quick else (4, 1024, 256)
    vocabularies = [1000] if args.quick else [32000, 128256]
    repeats = 1 if args.quick else args.repeats
    print(f"B={b} T={t} H={h}, the first half of each sequence prompt; forward + backward on the "
          f"CPU; ratios are against naive")
    print("| V | dtype | naive saved MiB | lean saved MiB | fused saved MiB | naive peak MiB | "
          "lean peak MiB | fused peak MiB | lean peak ratio | fused peak ratio | naive s | lean s "
          "| fused s | lean time ratio | fused time ratio | fused max abs diff |")
    print("|---" * 16 + "|")
    for v in vocabularies:
        for dtype in ("float32", "bfloat16"):
            sizes = [b, t, h, v]
            hidden, weight, labels = inputs(*sizes, getattr(torch, dtype))
            with torch.no_grad():
                diff = (fused(hidden, weight, labels)
                        - naive(hidden, weight, labels)).abs().max().item()
            saved = {name: saved_bytes(f, hidden, weight, labels) / 2**20
                     for name, f in PATHS.items()}
            peak = {name: peak_bytes(name, sizes, dtype) / 2**20 for name in PATHS}
            time_s = {name: seconds(f, hidden, weight, labels, repeats)
                      for name, f in PATHS.items()}
            print(f"| {v} | {dtype} | {saved['naive']:.0f} | {saved['lean']:.0f} | "
                  f"{saved['fused']:.1f} | {peak['naive']:.0f} | {peak['lean']:.0f} | "
                  f"{peak['fused']:.0f} | {peak['lean'] / max(peak['naive'], 1e-9):.3f} | "
                  f"{peak['fused'] / max(peak['naive'], 1e-9):.3f} | {time_s['naive']:.3f} | "
                  f"{time_s['lean']:.3f} | {time_s['fused']:.3f} | "
                  f"{time_s['lean'] / time_s['naive']:.2f} | "
                  f"{time_s['fused'] / time_s['naive']:.2f} | {diff:.1e} |",
                  flush=True)

if __name__ == "__main__":
    main()
