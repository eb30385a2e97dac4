"""Peak memory and step time of SPIN training: full fine-tuning, LoRA (--use_peft) and QLoRA
(--use_peft --load_in_4bit), on the same model and the same pairs, each in its own process, side
by side; ratios to full fine-tuning.

    python -m benchmarks.memory            # SmolLM2-135M's shape (random weights), 3 steps, 8 pairs
    python -m benchmarks.memory --quick    # a tiny model, 2 steps: what CI runs

The model is a randomly initialised LlamaForCausalLM with SmolLM2-135M-Instruct's configuration
(30 layers, hidden 576, vocabulary 49,152, tied embeddings); pairs of 96 prompt and 64 + 64 reply
tokens. Each configuration runs spin.train (RMSProp, the fast log-prob path) for its steps after
one warm-up step. Memory: on a GPU torch.cuda.max_memory_allocated; on a CPU the process's peak
resident set (ru_maxrss), which includes the Python interpreter and the libraries (~0.5 GB, the
same in every row). Time: seconds per optimizer step after the warm-up.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
CONFIGS = {"full": [], "lora": ["--use_peft"], "qlora": ["--use_peft", "--load_in_4bit"]}
if not torch.cuda.is_available():  # bitsandbytes' CPU kernels pass no gradient through 4-bit layers
    del CONFIGS["qlora"]  # (machinery/cli.py refuses QLoRA on a CPU)


def measure(config: str, shape: str, steps: int, work: Path) -> dict:
    """One configuration, in this process: build, warm up one step, time `steps` steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import spin
    import toy
    from machinery import adapters, models

    base = work / "base"
    if not base.exists():  # written once by the first configuration, read by the others
        torch.manual_seed(0)
        tokenizer = toy.build_tokenizer()
        LlamaForCausalLM(LlamaConfig(**SHAPES[shape],
                                     max_position_embeddings=512)).save_pretrained(base)
        tokenizer.save_pretrained(base)
    size = 8
    flags = ["--model", str(base), "--dataset", "toy", "--output_dir", str(work / config),
             "--quiet",
             "--per_device_train_batch_size", str(size), "--num_train_epochs", "1", "--max_length",
             "256", "--max_prompt_length", "128", "--learning_rate", "1e-5", *CONFIGS[config]]
    args = spin.parse_args(flags)
    _, model = models.load_model(str(base), quantization=adapters.quantization(args))
    model = adapters.wrap(model, args) if args.use_peft else model
    if torch.cuda.is_available() and not args.load_in_4bit:
        model = model.cuda()
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    pairs = [{"id": i, "iteration": 0,
              "prompt_ids": torch.randint(3, vocab, (96,), generator=g).tolist(),
              "real_ids": torch.randint(3, vocab, (64,), generator=g).tolist(),
              "generated_ids": torch.randint(3, vocab, (64,), generator=g).tolist()}
              for i in range(size * (steps + 1))]
    spin.opponent_logps(model, pairs, args)
    (work / config / "iter0").mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # warm-up: allocators, kernels
    spin.train(model, pairs[:size], learning_rate=1e-5, iteration=0, args=args,
               iteration_dir=work / config / "iter0")
    (work / config / "iter0" / "metrics.jsonl").unlink()
    started = time.time()
    spin.train(model, pairs[size:], learning_rate=1e-5, iteration=0, args=args,
               iteration_dir=work / config / "iter0")
    seconds = (time.time() - started) / steps
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"config": config, "seconds_per_step": seconds, "peak_gib": peak, "trainable": trainable}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, 2 steps (CI)")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)  # config shape steps work
    args = p.parse_args(argv)
    if args.worker:
        config, shape, steps, work = args.worker
        print(json.dumps(measure(config, shape, int(steps), Path(work))))
        return
    shape, steps = ("tiny", 2) if args.quick else ("smollm2-135m", 3)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}; LlamaForCausalLM {SHAPES[shape]}; {steps} steps of 8 pairs (96 + 64 + 64 "
          f"tokens)")
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for config in CONFIGS:  # one process each: a peak is that configuration's alone
            command = [sys.executable, "-m", __spec__.name, "--worker", config, shape,
                       str(steps), work]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{config}: {out.stderr[-2000:]}")
            rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
    memory = "peak GPU memory GiB" if torch.cuda.is_available() else "peak RSS GiB"
    print(f"| configuration | trainable parameters | s / step | {memory} | time vs full | memory "
          f"vs full |")
    print("|---|---|---|---|---|---|")
    full = rows["full"]
    for config, r in rows.items():
        print(f"| {config} | {r['trainable']:,} | {r['seconds_per_step']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['seconds_per_step'] / full['seconds_per_step']:.2f} | "
              f"{r['peak_gib'] / full['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
