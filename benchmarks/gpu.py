"""One SPIN iteration on one GPU, phase by phase, with the paper's recipe settings: a randomly
initialised Zephyr-architecture model (MistralForCausalLM) scaled to ~1B parameters, the
zephyr-7b-sft-full recipe's flags (bf16, packed rows, gradient checkpointing, λ 0.1, RMSProp),
the recipe's attention where it runs (FlashAttention-2, else SDPA: the first line says which), on
prompts and replies whose lengths are shaped like UltraChat's (log-normal, cut as
the recipe cuts them), through the project's own phase functions: generation (generate.generate),
the opponent pass (spin.opponent_logps) and training (spin.train), first plain PyTorch (float32
weights under bf16 autocast), then --deepspeed configs/ds_zero3.json on the same GPU (bf16 weights,
float32 masters): both in bf16, the recipe's way on each path.

    python -m benchmarks.gpu           # one H100/H200: ~1B parameters, 256 prompts, 256 new tokens
    python -m benchmarks.gpu --tiny    # CPU, a tiny model, 16 prompts (CI: --prompts 8)

Prints per phase: tokens/s, seconds, peak GPU memory (torch.cuda.max_memory_allocated, reset before
each phase); for training also MFU = F · non-embedding parameters · trained tokens / seconds / the
card's peak bf16 dense FLOP/s, with F = 8 under gradient checkpointing (forward, recomputed
forward, backward: 2 + 2 + 4) and 6 without; attention's T² term is left out, so MFU is
slightly understated. Then the projected time of one Zephyr-7B iteration of the recipe (50k prompts,
2 epochs, 8 GPUs like this one) from these figures, with what it assumes about communication.
"""
import argparse
import math
import os
import tempfile
import time
from pathlib import Path


import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator for --tiny

from machinery import distributed
import generate
import spin

# MistralForCausalLM shapes; "1b" is Zephyr-7B's architecture (GQA 4:1, SwiGLU) at ~0.94B parameters
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}
ZEPHYR_PARAMETERS = 7.24e9
ZEPHYR_NON_EMBEDDING = 7.24e9 - 32000 * 4096  # the input embedding is a lookup, not a matmul
# assumed per-GPU all-gather / reduce-scatter bandwidth over NVLink, GB/s (an assumption, stated)
LINK_GBPS = 150
# dense, NVIDIA's data sheets
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def attention() -> str:
    """The recipe's attention, FlashAttention-2, where flash-attn is installed and runs on this GPU
    (cli.flash_attention_fault: one call, forward and backward); else SDPA."""
    from machinery import cli

    runs = cli.flash_attention_available() and cli.flash_attention_fault() is None
    return "flash_attention_2" if runs else "sdpa"


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if all(w in name for w in k.split())), None)


def tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens "t0", "t1", ...: ids in, text out, EOS id 2, pad
    id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", unk_token="t1",
                                   eos_token="t2")


def ultrachat_shaped(n: int, vocab: int, scale: float, seed: int = 0) -> list[dict]:
    """Prompts and human replies with UltraChat-like lengths: log-normal, median ~120 prompt tokens
    and ~250 reply tokens (scaled by `scale`), cut to the recipe's 512 / 1024; random token ids."""
    g = torch.Generator().manual_seed(seed)

    def lognormal(median, sigma, low, high):
        return int(min(high, max(low, median * scale
                                 * math.exp(sigma * torch.randn(1, generator=g).item()))))

    rows = []
    for i in range(n):
        prompt = lognormal(120, 0.8, 4, 512 * scale)
        reply = lognormal(250, 0.6, 2, 1024 * scale - prompt)
        rows.append({"id": i,
                     "prompt_ids": torch.randint(3, vocab, (prompt,), generator=g).tolist(),
                     "real_ids": torch.randint(3, vocab, (reply,), generator=g).tolist()})
    return rows


def memory() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def run(size: str, rows: list[dict], flags: list[str], out: Path) -> dict:
    """The three phases of one SPIN iteration; {phase: {tokens, seconds, memory_gib}} and
    parameters."""
    from transformers import MistralConfig, MistralForCausalLM

    args = spin.parse_args(["--model", "zephyr-7b-sft-full", "--dataset", "toy", "--output_dir",
                            str(out), "--quiet",
                            *flags])  # the recipe's settings; its model and data are not loaded
    if "--deepspeed" not in flags:
        args.deepspeed = None  # the plain run: the recipe names ZeRO-3
    distributed.setup(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = MistralConfig(**SIZES[size], max_position_embeddings=4096,
                           attn_implementation=args.attn_implementation)
    model = MistralForCausalLM(config).to(spin.weights_dtype(args)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    non_embedding = parameters - model.get_input_embeddings().weight.numel()
    tok = tokenizer(config.vocab_size)
    phases = {}

    reset_memory()
    started = time.time()
    prompts = [r["prompt_ids"] for r in rows]
    samples = generate.generate(model, tok, prompts, generate.Sampling.of_run(args), seed=0,
                                stop=[2])
    phases["generation"] = {"tokens": sum(len(s["generated_ids"]) for s in samples),
                            "seconds": time.time() - started, "memory_gib": memory()}
    pairs = [{**r, "iteration": 0, "generated_ids": s["generated_ids"] or [2]}
             for r, s in zip(rows, samples)]
    pair_tokens = sum(2 * min(len(p["prompt_ids"]), args.max_prompt_length) + len(p["real_ids"])
                      + len(p["generated_ids"])
                      for p in pairs)

    reset_memory()
    started = time.time()
    spin.opponent_logps(model, pairs, args)
    phases["opponent pass"] = {"tokens": pair_tokens, "seconds": time.time() - started,
                               "memory_gib": memory()}

    # ZeRO-3 keeps float32 masters: train a float32 copy
    if spin.weights_dtype(args) != torch.float32:
        model = model.float()
    reset_memory()
    started = time.time()
    (out / "iter0").mkdir(parents=True, exist_ok=True)
    history, _ = spin.train(model, pairs, learning_rate=5e-7, iteration=0, args=args,
                             iteration_dir=out / "iter0")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    phases["training"] = {"tokens": pair_tokens * args.num_train_epochs,
                          "seconds": time.time() - started,
                          "memory_gib": memory(), "steps": len(history)}
    flops_per_parameter = 8 if args.gradient_checkpointing else 6  # per trained token
    return {"phases": phases, "parameters": parameters, "non_embedding": non_embedding,
            "flops_per_parameter": flops_per_parameter}


def report(name: str, result: dict, peak: float | None) -> list[str]:
    lines = []
    for phase, m in result["phases"].items():
        rate = m["tokens"] / m["seconds"]
        mfu = ""
        if phase == "training" and peak:
            flops = result["flops_per_parameter"] * result["non_embedding"] * rate
            mfu = f"{flops / peak:.1%}"
        gib = f"{m['memory_gib']:.1f}" if m["memory_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {name} | {phase} | {m['tokens']} | {m['seconds']:.1f} | {rate:,.0f} | "
                     f"{gib} | {mfu} |")
    return lines


def projection(result: dict, rows: list[dict], scale: float) -> list[str]:
    """Zephyr-7B, 50k prompts, 8 GPUs like this one, from the measured rates: generation and the
    opponent pass scale with the weights each token passes through (×P_1B/P_7B per GPU), training
    with FLOPs at the FLOP rate the ZeRO-3 run achieved (the same recomputation factor).
    Communication: ZeRO-3 all-gathers the bf16 weights for forward, again for the recomputed
    forward and backward, and reduce-scatters the gradients, ~4 × 2 bytes × P per micro-batch per
    GPU; the projection assumes it overlaps with compute, and prints what it would cost at
    LINK_GBPS if it did not."""
    ratio = result["parameters"] / ZEPHYR_PARAMETERS
    ph = result["phases"]
    per_prompt = {k: ph[k]["tokens"] / len(rows) / scale for k in ("generation", "opponent pass")}
    rate = {k: ph[k]["tokens"] / ph[k]["seconds"] for k in ph}  # tokens/s of each phase
    achieved = result["flops_per_parameter"] * result["non_embedding"] * rate["training"]
    out = []
    for t, pairs in ((0, 50_000), (1, 100_000)):  # iterations ≥ 1 also train on the previous pairs
        generation = 50_000 * per_prompt["generation"] / (rate["generation"] * ratio * 8)
        opponent = pairs * per_prompt["opponent pass"] / (rate["opponent pass"] * ratio * 8)
        train_tokens = pairs * per_prompt["opponent pass"] * 2  # 2 epochs
        flops = result["flops_per_parameter"] * ZEPHYR_NON_EMBEDDING * train_tokens
        training = flops / (achieved * 8)
        # global batch 64 = 8 GPUs × 8 pairs, no accumulation; 2 epochs
        micro_batches = math.ceil(pairs / 64) * 2
        # seconds, if not overlapped
        traffic = micro_batches * 4 * 2 * ZEPHYR_PARAMETERS / (LINK_GBPS * 1e9)
        out.append(f"iteration {t} ({pairs} pairs): generation {generation / 3600:.2f} h + "
                   f"opponent pass {opponent / 3600:.2f} h + training {training / 3600:.2f} h = "
                   f"{(generation + opponent + training) / 3600:.2f} h, communication overlapped; "
                   f"ZeRO-3 traffic {traffic / 3600:.2f} h more at {LINK_GBPS} GB/s per GPU if it "
                   f"were not")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model, 16 prompts (float32 on a CPU): for CI")
    p.add_argument("--prompts", type=int)
    args = p.parse_args(argv)
    size, scale = ("tiny", 1 / 16) if args.tiny else ("1b", 1.0)
    rows = ultrachat_shaped(args.prompts or (16 if args.tiny else 256), SIZES[size]["vocab_size"],
                            scale)
    accumulation = 2 if args.tiny else 8  # 8 × 8 = the recipe's global batch 64 on one GPU
    attn = attention()
    common = ["--max_prompt_length", str(int(512 * scale)), "--max_length", str(int(1024 * scale)),
              "--max_new_tokens", str(int(256 * scale)), "--generation_batch_size", "64",
              "--num_train_epochs", "2",
              "--per_device_train_batch_size", "8", "--gradient_accumulation_steps",
              str(accumulation),
              "--global_batch_size", str(8 * accumulation), "--attn_implementation", attn,
              # CPU: float32
              *(["--no-bf16"] if args.tiny and not torch.cuda.is_available() else [])]
    peak = peak_flops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}; model: MistralForCausalLM {SIZES[size]}; {len(rows)} prompts; peak bf16 "
          f"{peak / 1e12:.0f} "
          f"TFLOP/s" if peak else f"{device}; model {SIZES[size]}; {len(rows)} prompts; no MFU "
                                  f"(unknown peak)")
    print(f"attention: {attn}")
    print("| run | phase | tokens | seconds | tokens/s | peak memory GiB | MFU |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name, flags in (("plain", []), ("zero3", ["--deepspeed", "configs/ds_zero3.json"])):
        with tempfile.TemporaryDirectory() as out:
            results[name] = run(size, rows, common + flags, Path(out))
        print("\n".join(report(name, results[name], peak)), flush=True)
    r = results["zero3"]
    print(f"\nparameters: {r['parameters']:,} ({r['non_embedding']:,} outside the input "
          f"embedding); training tokens count prompt + reply of both sequences of a pair; MFU = "
          f"{r['flops_per_parameter']}·P_non-embedding·tokens/s / peak "
          f"({r['flops_per_parameter']}: {'with' if r['flops_per_parameter'] == 8 else 'without'} "
          f"gradient checkpointing's recomputed forward)")
    print("Projected Zephyr-7B iteration on 8 of these GPUs (ZeRO-3 rates; decoding and scoring "
          "scaled by parameters, training at the measured achieved FLOP/s):")
    for line in projection(results["zero3"], rows, scale):
        print("  " + line)


if __name__ == "__main__":
    main()
