"""Padding in training, side by side: shuffled steps against length-grouped ones
(batching.grouped_by_length), each with padded rows (data.collate) and padding-free packed rows
(batching.pack; both defaults on): the share of the forward passes' token slots that are padding,
training throughput in real (non-padding) tokens per second, and the loss statistics of the runs.

    python -m benchmarks.padding            # 192 pairs, UltraChat-shaped lengths at 1/4 scale, CPU
    python -m benchmarks.padding --scale 1 --prompts 512    # the recipe's lengths (a GPU)

The pairs: prompts and human replies from benchmarks/gpu.py's UltraChat-shaped length mix, and a
generated reply per pair whose length is log-normal around 200 tokens, cut at max_new_tokens 256
(scaled); random token ids. The model: a randomly initialised MistralForCausalLM (hidden 256, 4
layers, vocabulary 8000), float32, SDPA; 1 epoch, 8 pairs per step; both runs train the same
pairs from the same weights; only the order of the pairs and the layout of the rows differ."""
import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


import torch

import data
from machinery import batching
import spin
from benchmarks.gpu import ultrachat_shaped


def padding_share(steps, args) -> float:
    """Padding over all slots of the batches the forward passes get: each micro-batch's 2·per_device
    sequences (a pair's y and y') padded to the longest (data.collate), or packed
    (batching.pack)."""
    real = slots = 0
    for _, step in steps:
        for k in range(0, len(step), args.per_device_train_batch_size):
            pairs = step[k:k + args.per_device_train_batch_size]
            sequences = [data.build_sequence(p["prompt_ids"], p[key], args.max_prompt_length,
                                             args.max_length)
                         for key in ("real_ids", "generated_ids") for p in pairs]
            batch = batching.pack(sequences) if args.padding_free else data.collate(sequences)
            real, slots = real + sum(len(s["input_ids"])
                                     for s in sequences), slots + batch["input_ids"].numel()
    return 1 - real / slots


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=192)
    p.add_argument("--scale", type=float, default=0.25)
    args_ = p.parse_args(argv)
    from transformers import MistralConfig, MistralForCausalLM

    vocab = 8000
    rows = ultrachat_shaped(args_.prompts, vocab, args_.scale)
    g = torch.Generator().manual_seed(1)
    max_new = int(256 * args_.scale)
    pairs = [{**r, "iteration": 0, "generated_ids": torch.randint(3, vocab, (min(max_new, max(
        1, int(200 * args_.scale * math.exp(0.5 * torch.randn(1, generator=g).item())))),),
        generator=g).tolist()}
        for r in rows]
    config = MistralConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    print(f"{len(pairs)} pairs, lengths at scale {args_.scale}; MistralForCausalLM hidden 256, 4 "
          f"layers, vocabulary {vocab}; {torch.get_num_threads()} CPU "
          f"threads" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    print("| steps | padding share | real tokens/s | mean loss | last loss | seconds |")
    print("|---|---|---|---|---|---|")
    rates = {}
    for name, flags in (("shuffled", ["--no-group_by_length", "--no-padding_free"]),
                        ("length-grouped", ["--group_by_length", "--no-padding_free"]),
                        ("shuffled, padding-free", ["--no-group_by_length", "--padding_free"]),
                        ("length-grouped, padding-free", ["--group_by_length", "--padding_free"])):
        with tempfile.TemporaryDirectory() as out:
            args = spin.parse_args(["--dataset", "toy", "--output_dir", out, "--quiet", *flags,
                                    "--num_train_epochs", "1",
                                    "--per_device_train_batch_size", "8", "--max_prompt_length",
                                    str(int(512 * args_.scale)),
                                    "--max_length", str(int(1024 * args_.scale))])
            torch.manual_seed(0)
            model = MistralForCausalLM(config)  # the same weights in both runs
            if "opponent_real_logp" not in pairs[0]:
                # θ_0 is the opponent: not timed, the same for both
                spin.opponent_logps(model, pairs, args)
            share = padding_share(spin.batches(pairs, 0, args), args)
            (Path(out) / "iter0").mkdir()
            started = time.time()
            history, _ = spin.train(model, pairs, learning_rate=1e-5, iteration=0,
                                      args=args, iteration_dir=Path(out) / "iter0")
            seconds = time.time() - started
        real = sum(2 * min(len(q["prompt_ids"]), args.max_prompt_length) + len(q["real_ids"])
                   + len(q["generated_ids"])
                   for q in pairs)
        rates[name] = real / seconds
        losses = [h["loss"] for h in history]
        print(f"| {name} | {share:.3f} | {rates[name]:,.0f} | {statistics.mean(losses):.4f} | "
              f"{losses[-1]:.4f} | {seconds:.1f} |", flush=True)
    for name in list(rates)[1:]:
        print(f"throughput, {name} / shuffled: {rates[name] / rates['shuffled']:.2f}x")


if __name__ == "__main__":
    main()
