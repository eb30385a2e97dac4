"""Peak memory and step time of SPIN training: full fine-tuning, LoRA (--use_peft) and QLoRA
(--use_peft --load_in_4bit), on the same model and the same pairs, each in its own process, side
by side; ratios to full fine-tuning. Then, on a GPU, the QLoRA recipe itself on Mistral-7B's shape.

    python -m benchmarks.memory            # SmolLM2-135M's shape (random weights), 3 steps, 8 pairs
    python -m benchmarks.memory --quick    # a tiny model, 2 steps: what CI runs

The model is a randomly initialised LlamaForCausalLM with SmolLM2-135M-Instruct's configuration
(30 layers, hidden 576, vocabulary 49,152, tied embeddings); pairs of 96 prompt and 64 + 64 reply
tokens. Each configuration runs spin.train (RMSProp, the fast log-prob path) for its steps after
one warm-up step. Memory: on a GPU torch.cuda.max_memory_allocated; on a CPU the process's peak
resident set (ru_maxrss), which includes the Python interpreter and the libraries (~0.5 GB, the
same in every row). Time: seconds per optimizer step after the warm-up.

The recipe row (a GPU only, not with --quick): `--model zephyr-7b-sft-full-qlora`'s settings as
spin.py resolves them (--bf16, --gradient_checkpointing, LoRA r 16 / alpha 32 on every linear
layer, the base in NF4, 4 pairs per device, --max_length 1024, --max_prompt_length 512, its
attention where it runs) on a randomly initialised MistralForCausalLM of Mistral-7B's shape, built
from its configuration (no download; written once to a temporary directory, ~14.5 GB in bf16),
pairs of 512 prompt and 512 + 512 reply tokens: the longest the recipe trains on. One micro-batch
per step (the recipe accumulates 16 to reach its 64 pairs; accumulating adds no memory beyond the
adapters' gradients): its peak is what docs/scaling.md's 24 GB arithmetic claims for training.
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
    # Mistral-7B-v0.1's, which zephyr-7b-sft-full fine-tunes (MistralForCausalLM)
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False),
}
CONFIGS = {"full": [], "lora": ["--use_peft"], "qlora": ["--use_peft", "--load_in_4bit"]}
if not torch.cuda.is_available():  # bitsandbytes' CPU kernels pass no gradient through 4-bit layers
    del CONFIGS["qlora"]  # (machinery/cli.py refuses QLoRA on a CPU)
RECIPE = "zephyr-7b-sft-full-qlora"  # machinery/recipes.py: the paper's recipe on one 24 GB GPU


def flags(config: str, base: Path, out: Path) -> list[str]:
    """spin.py's flags of a configuration; the recipe row takes the recipe's own settings."""
    if config == RECIPE:  # its model is --model's recipe; measure() loads `base` instead
        return ["--model", RECIPE, "--output_dir", str(out), "--quiet",
                "--gradient_accumulation_steps", "1", "--global_batch_size", "0"]
    return ["--model", str(base), "--dataset", "toy", "--output_dir", str(out), "--quiet",
            "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--max_length",
            "256", "--max_prompt_length", "128", "--learning_rate", "1e-5", *CONFIGS[config]]


def build(shape: str, base: Path) -> None:
    """A randomly initialised model of `shape` with the toy's tokenizer (the pairs are random ids
    below the vocabulary), saved as a model directory: Mistral-7B in bf16, built on the GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    import toy

    torch.manual_seed(0)
    if shape == "mistral-7b":
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(MistralConfig(**SHAPES[shape]),
                                                     dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape],
                                                             max_position_embeddings=512))
    model.save_pretrained(base)
    toy.build_tokenizer().save_pretrained(base)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(config: str, shape: str, steps: int, work: Path) -> dict:
    """One configuration, in this process: build, warm up one step, time `steps` steps."""
    import spin
    from machinery import adapters, models
    from machinery.prepare import weights_dtype

    base = work / f"base-{shape}"
    if not base.exists():  # written once by the first configuration, read by the others
        build(shape, base)
    args = spin.parse_args(flags(config, base, work / config))
    size = args.per_device_train_batch_size
    _, model = models.load_model(str(base), attn_implementation=args.attn_implementation,
                                 dtype=weights_dtype(args),
                                 quantization=adapters.quantization(args))
    model = adapters.wrap(model, args) if args.use_peft else model
    if torch.cuda.is_available() and not args.load_in_4bit:
        model = model.cuda()
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    prompt, reply = (args.max_prompt_length, args.max_length - args.max_prompt_length) \
        if config == RECIPE else (96, 64)
    pairs = [{"id": i, "iteration": 0,
              "prompt_ids": torch.randint(3, vocab, (prompt,), generator=g).tolist(),
              "real_ids": torch.randint(3, vocab, (reply,), generator=g).tolist(),
              "generated_ids": torch.randint(3, vocab, (reply,), generator=g).tolist()}
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
    return {"config": config, "seconds_per_step": seconds, "peak_gib": peak, "trainable": trainable,
            "pairs_per_step": size, "tokens": prompt + 2 * reply,
            "attention": model.config._attn_implementation}


def worker(config: str, shape: str, steps: int, work: str) -> dict:
    """measure() in a process of its own: a peak is that configuration's alone."""
    command = [sys.executable, "-m", __spec__.name, "--worker", config, shape, str(steps), work]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{config}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    """Every configuration in a process of its own, then the table (and the recipe's row)."""
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
    with tempfile.TemporaryDirectory() as work:
        rows = {config: worker(config, shape, steps, work) for config in CONFIGS}
        recipe = worker(RECIPE, "mistral-7b", 2, work) \
            if torch.cuda.is_available() and not args.quick else None
    memory = "peak GPU memory GiB" if torch.cuda.is_available() else "peak RSS GiB"
    print(f"| configuration | trainable parameters | s / step | {memory} | time vs full | memory "
          f"vs full |")
    print("|---|---|---|---|---|---|")
    full = rows["full"]
    for config, r in rows.items():
        print(f"| {config} | {r['trainable']:,} | {r['seconds_per_step']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['seconds_per_step'] / full['seconds_per_step']:.2f} | "
              f"{r['peak_gib'] / full['peak_gib']:.2f} |")
    if recipe:
        print(f"\nThe recipe {RECIPE} on MistralForCausalLM {SHAPES['mistral-7b']}, "
              f"{recipe['attention']}; 2 steps of {recipe['pairs_per_step']} pairs "
              f"({recipe['tokens']} tokens each), one micro-batch per step:")
        print(f"| configuration | trainable parameters | s / step | {memory} |\n|---|---|---|---|")
        print(f"| {RECIPE} | {recipe['trainable']:,} | {recipe['seconds_per_step']:.2f} | "
              f"{recipe['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
