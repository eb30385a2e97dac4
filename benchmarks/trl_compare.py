"""One SPIN iteration's training work against TRL's DPOTrainer doing the same work, side by side.

Same model, same pairs (chosen = the human response y, rejected = the generated y'), same batch,
same λ (TRL's beta), same lengths, same optimizer (RMSProp), one epoch, CPU:

    spin              this project: the opponent's log-probs in one pass, then training (spin.train)
    trl               TRL DPOTrainer, its default: a live reference model, scored every step
    trl_precompute    TRL DPOTrainer with precompute_ref_log_probs=True (its fastest setting)

Throughput: pairs per second over everything after the model is loaded (ours: opponent pass +
training; TRL: building the trainer, which tokenizes the rows and, with precompute, scores them,
plus trainer.train()). Peak memory: each run in a fresh process; the peak resident memory above
what the process held after loading the model (Linux's peak counter reset at that point).

Before timing, a check that the two compute the same thing: with a policy that differs from the
opponent (so that the loss is not just log 2), the first step's loss and rewards of spin.train and
of DPOTrainer on the same batch must agree to 1e-6 through spin.train's exact path (--no-fast_logps:
loss.sequence_logps on padded rows' logits, a float32 log-softmax as TRL's; measured 2.4e-7 on
2026-11-30), and to 1e-4 through its default one (packed rows,
the fused head: the same sums of up to 256 log-probs near −10.4 each (ln 32,000), rounded in
another order; a float32 step at 1,024–2,048 is 1.2e-4, times λ in a reward).

    pip install -r benchmarks/requirements.txt
    python -m benchmarks.trl_compare            # the measurement in docs/performance.md
    python -m benchmarks.trl_compare --quick    # tiny sizes, in one process: what CI runs
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import data
import spin
import toy

FULL = dict(hidden=256, layers=4, vocab=32000, pairs=128, batch=8, prompt=(32, 256),
            response=(32, 256), max_length=512)
QUICK = dict(hidden=32, layers=2, vocab=1000, pairs=16, batch=4, prompt=(4, 24), response=(4, 24),
             max_length=48)
BETA, LR = 0.1, 1e-5


def make_model(sizes: dict, path: Path, seed: int = 0, noise: float = 0.0) -> None:
    """A Mistral with the toy's character tokenizer and a vocabulary of `vocab` (Mistral's:
    32,000)."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = toy.build_tokenizer()
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                           intermediate_size=2 * sizes["hidden"],
                           num_hidden_layers=sizes["layers"], num_attention_heads=8,
                           num_key_value_heads=4, max_position_embeddings=1024, sliding_window=None,
                           tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    model = MistralForCausalLM(config)
    if noise:  # the policy of the agreement check: the opponent, moved a little
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_rows(sizes: dict, seed: int = 0) -> list[dict]:
    """Pairs of mixed lengths: a prompt, the human response, a generated response (random text)."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "

    def text(bounds):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(*bounds)))

    return [{"prompt": text(sizes["prompt"]), "real": text(sizes["response"]),
             "generated": text(sizes["response"])}
            for _ in range(sizes["pairs"])]


def spin_args(sizes: dict, tokenizer, batch: int, padding_free: bool = True) -> Namespace:
    return Namespace(per_device_train_batch_size=batch, gradient_accumulation_steps=1, world_size=1,
                     rank=0, num_train_epochs=1, warmup_ratio=0.1, max_grad_norm=1.0,
                     max_length=sizes["max_length"],
                     max_prompt_length=sizes["max_length"], beta=BETA, loss_type="logistic",
                     bf16=False, gradient_checkpointing=False, seed=0, quiet=True, save_steps=10**9,
                     deepspeed=None,
                     # random steps, as TRL's sampler: the comparison is of the step itself
                     group_by_length=False,
                     # spin.py's default: on (TRL's padding_free needs FlashAttention)
                     padding_free=padding_free,
                     # the exact path: loss.sequence_logps on the logits, the textbook
                     fast_logps=padding_free)


def run_spin(model, opponent, tokenizer, rows: list[dict], sizes: dict, batch: int, out: Path,
             padding_free: bool = True) -> list[dict]:
    """What spin.main does for one iteration once the responses are sampled; returns the step
    metrics."""
    args = spin_args(sizes, tokenizer, batch, padding_free)
    out.mkdir(parents=True, exist_ok=True)
    chat = data.ChatFormat(tokenizer)
    pairs = [{"prompt_ids": chat.prompt_ids([{"role": "user", "content": r["prompt"]}]),
              "real_ids": chat.reply_ids([{"role": "user", "content": r["prompt"]}], r["real"]),
              "generated_ids": chat.reply_ids([{"role": "user", "content": r["prompt"]}],
                                              r["generated"])} for r in rows]
    spin.opponent_logps(opponent, pairs, args)
    history, _ = spin.train(model, pairs, learning_rate=LR, iteration=0, args=args,
                             iteration_dir=out)
    return history


def run_trl(model, ref_model, tokenizer, rows: list[dict], sizes: dict, batch: int,
            precompute: bool, out: Path, max_steps: int = -1) -> list[dict]:
    """DPOTrainer on the same pairs: prompt = the chat-rendered prompt text, chosen = y, rejected
    = y'."""
    import datasets
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    prompt_text = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                 add_generation_prompt=True,
                                                 tokenize=False) for r in rows]
    dataset = datasets.Dataset.from_list([{"prompt": p, "chosen": r["real"],
                                           "rejected": r["generated"]}
                                          for p, r in zip(prompt_text, rows)])
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
                       max_steps=max_steps,
                       # a ratio
                       learning_rate=LR, optim="rmsprop", lr_scheduler_type="linear",
                       warmup_steps=0.1,
                       weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
                       max_length=sizes["max_length"], precompute_ref_log_probs=precompute,
                       logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                       dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # its per-step dicts on stdout
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def agreement(sizes: dict, work: Path) -> dict:
    """First-step loss and rewards of DPOTrainer and of spin.train, policy ≠ opponent, one batch
    of 8: {path: {quantity: (ours, theirs)}} for spin.train's exact path (--no-fast_logps:
    loss.sequence_logps on padded rows, a float32 log-softmax as TRL's) and its default one
    (packed rows, the fused head: other float32 roundings of the same sums)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_model(sizes, work / "opponent")
    make_model(sizes, work / "policy", noise=0.02)
    tokenizer = AutoTokenizer.from_pretrained(work / "opponent")
    rows = make_rows({**sizes, "pairs": 8}, seed=1)

    def load(name):
        return AutoModelForCausalLM.from_pretrained(work / name).eval()

    theirs = run_trl(load("policy"), load("opponent"), tokenizer, rows, sizes, 8, False,
                     work / "trl-check", 1)[0]
    out = {}
    for path, padding_free in (("exact", False), ("default", True)):  # exact: loss.sequence_logps
        ours = run_spin(load("policy"), load("opponent"), tokenizer, rows, sizes, 8,
                        work / f"spin-check-{path}", padding_free)[0]
        out[path] = {"loss": (ours["loss"], theirs["loss"]),
                     "real_reward": (ours["real_reward"], theirs["rewards/chosen"]),
                     "generated_reward": (ours["generated_reward"], theirs["rewards/rejected"])}
    return out


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, sizes: dict, work: Path) -> dict:
    """One variant's seconds and peak memory, in this process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    rows = make_rows(sizes)
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    opponent = AutoModelForCausalLM.from_pretrained(work / "model") if variant == "spin" else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    before = resident()
    started = time.perf_counter()
    if variant == "spin":
        run_spin(model, opponent, tokenizer, rows, sizes, sizes["batch"], work / f"out-{variant}")
    else:
        run_trl(model, None, tokenizer, rows, sizes, sizes["batch"], variant == "trl_precompute",
                work / f"out-{variant}")
    seconds = time.perf_counter() - started
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"variant": variant, "seconds": seconds, "pairs_per_s": sizes["pairs"] / seconds,
            "peak_mib": (peak - before) / 2**20}


VARIANTS = ["spin", "trl", "trl_precompute"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny sizes, one process, one repeat")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each variant, interleaved; medians reported")
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.worker:
        from transformers.utils import logging

        logging.disable_progress_bar()
        print(json.dumps(measure(args.worker[0], sizes, Path(args.worker[1]))))
        return
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        check = agreement(sizes, work)
        print("first step, policy ≠ opponent, the same batch of 8 pairs: spin.train vs TRL "
              "DPOTrainer")
        # each path against its own bound: what is printed is what decides the exit status
        agreed = []
        for path, bound in (("exact", 1e-6), ("default", 1e-4)):
            how = ("loss.sequence_logps on padded rows" if path == "exact"
                   else "packed rows, fused head")
            print(f" spin.train's {path} path ({how})")
            for key, (ours, theirs) in check[path].items():
                print(f"  {key:<17} {ours:+.8f} {theirs:+.8f}  |diff| {abs(ours - theirs):.1e}")
            worst = max(abs(a - b) for a, b in check[path].values())
            agreed.append(worst < bound)
            print(f"  agree to {bound:.0e}: {'yes' if agreed[-1] else 'NO'}")
        make_model(sizes, work / "model")
        runs = {v: [] for v in VARIANTS}
        for _ in range(1 if args.quick else args.repeats):
            for variant in VARIANTS:  # interleaved: drifts of the machine hit every variant alike
                if args.quick:
                    runs[variant].append(measure(variant, sizes, work))
                else:
                    command = [sys.executable, "-m", __spec__.name, "--worker", variant, str(work)]
                    out = subprocess.run(command, capture_output=True, text=True, check=True)
                    runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\none iteration: {sizes['pairs']} pairs, batch {sizes['batch']}, 1 epoch, λ {BETA}, "
          f"RMSProp; Mistral hidden {sizes['hidden']}, {sizes['layers']} layers, vocabulary "
          f"{sizes['vocab']}; prompt and responses {sizes['prompt'][0]}-{sizes['prompt'][1]} "
          f"tokens; medians of {len(runs['spin'])} run(s)")
    print("| variant | seconds | pairs/s | spin speed-up | peak MiB | spin memory ratio |")
    print("|---|---|---|---|---|---|")
    med = {v: {k: statistics.median(r[k] for r in runs[v])
               for k in ("seconds", "pairs_per_s", "peak_mib")}
           for v in VARIANTS}
    for v in VARIANTS:
        print(f"| {v} | {med[v]['seconds']:.1f} | {med[v]['pairs_per_s']:.2f} | "
              f"{med['spin']['pairs_per_s'] / med[v]['pairs_per_s']:.2f}x | "
              f"{med[v]['peak_mib']:.0f} | "
              f"{med['spin']['peak_mib'] / max(med[v]['peak_mib'], 1e-9):.2f} |")
    if not all(agreed):
        sys.exit(1)


if __name__ == "__main__":
    main()
