"""SPIN, Algorithm 1 of arXiv 2401.01335v3 (Self-Play Fine-Tuning), as one visible loop.

    for t in 0 .. iters-1:
        y'  ~ p_θt(·|x) for every prompt x of the SFT data     (generate.py: the frozen opponent)
        log p_θt(y|x), log p_θt(y'|x), once for the iteration   (opponent_logps: no second model)
        θ_{t+1} = argmin_θ L_SPIN(θ, θ_t)  on (x, y, y')         (train: loss.py, Eq. 4.7)
        θ_{t+1} is the next opponent

    python spin.py                                          # the embedded toy, offline, ~3 min on 2 CPU cores
    python spin.py --model zephyr-7b-sft-full --iters 4     # the paper's recipe (GPUs)
    python spin.py --model PATH_OR_HUB_ID --dataset data.jsonl --output_dir runs/mine

Run directory (--output_dir):
    config.json                 the resolved configuration
    metrics.jsonl               one line per optimizer step (all iterations)
    iterations.jsonl            one line per iteration: losses, rewards, toy metrics, time
    iter{t}/synthetic.jsonl     the prompts, real and generated responses of iteration t, with token ids
                                and the opponent's log-probs
    iter{t}/model/              θ_{t+1}: save_pretrained model + tokenizer, the opponent of iteration t+1
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import generate as gen
from loss import sequence_logps, spin_loss
from recipes import DEFAULTS, RECIPES


class UsageError(ValueError):
    """A bad flag or model: shown as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # Flags default to None so that we can tell "given" from "not given": a recipe fills the rest.
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="toy", help=f"recipe ({', '.join(RECIPES)}), model directory or hub id")
    g.add_argument("--dataset", help="'toy', a local .jsonl/.json/.parquet file, or a hub data set name")
    g.add_argument("--dataset_split", help="split of a hub data set (default: train)")
    g.add_argument("--max_samples", type=int, help="number of prompts, sampled with --seed (default: all)")
    g.add_argument("--turn", choices=["first", "last"], default="first",
                   help="which assistant reply of a conversation is the human response (paper: first)")
    g.add_argument("--output_dir", help="the run directory (default: runs/<model name>)")
    g.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing run directory")
    g = p.add_argument_group("SPIN")
    g.add_argument("--iters", type=int, help="self-play iterations T (paper: 4)")
    g.add_argument("--beta", type=float, help="λ in the paper: the regularization of Eq. 4.7 (paper: 0.1)")
    g.add_argument("--loss_type", choices=["logistic", "hinge"], default="logistic", help="ℓ in Eq. 4.7")
    g.add_argument("--mix_previous_iteration", action=argparse.BooleanOptionalAction, default=True,
                   help="iteration t ≥ 1 also trains on the pairs generated at t−1 (paper: yes)")
    g = p.add_argument_group("generation (the opponent's samples)")
    g.add_argument("--max_new_tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top_p", type=float)
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    g.add_argument("--generation_batch_size", type=int)
    g = p.add_argument_group("optimization (Hugging Face names)")
    g.add_argument("--learning_rate", type=float, nargs="+", help="one per iteration; the last one repeats")
    g.add_argument("--num_train_epochs", type=int)
    g.add_argument("--per_device_train_batch_size", type=int, help="pairs per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=int)
    g.add_argument("--warmup_ratio", type=float)
    g.add_argument("--max_grad_norm", type=float)
    g.add_argument("--max_length", type=int, help="prompt + response tokens")
    g.add_argument("--max_prompt_length", type=int, help="prompt tokens, cut from the left")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("scale")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--attn_implementation", help="eager, sdpa or flash_attention_2")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    recipe = RECIPES.get(args.model, {})
    for key, value in {**DEFAULTS, **recipe}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.recipe = args.model if recipe else None
    args.model = recipe.get("model", args.model)
    args.output_dir = args.output_dir or os.path.join("runs", Path(args.model).name or "model")
    validate(args)
    return args


def validate(args) -> None:
    checks = [
        (args.iters >= 1, "--iters must be at least 1"),
        (args.beta > 0, "--beta (λ) must be positive"),
        (all(lr > 0 for lr in args.learning_rate), "--learning_rate values must be positive"),
        (args.num_train_epochs >= 1, "--num_train_epochs must be at least 1"),
        (args.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.max_grad_norm > 0, "--max_grad_norm must be positive"),
        (args.max_prompt_length >= 1, "--max_prompt_length must be at least 1"),
        (args.max_length > args.max_prompt_length,
         "--max_length must exceed --max_prompt_length, or no response token fits"),
        (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
        (args.temperature > 0, "--temperature must be positive (use --greedy for argmax decoding)"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.generation_batch_size >= 1, "--generation_batch_size must be at least 1"),
        (args.max_samples is None or args.max_samples >= 1, "--max_samples must be at least 1"),
        (args.dataset is not None, f"--dataset is required with --model {args.model} (not a recipe)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def go_offline_if_hub_unreachable(*names: str) -> None:
    """Without network, huggingface_hub retries each request for ~30 s before giving up. A 3 s probe
    instead: when the Hub cannot be reached, switch to offline mode, so cached models still load
    and anything else fails at once with the message of load_model or data.load_rows."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or all(n == "toy" or Path(n).exists() for n in names):
        return
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants

    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        print(f"note: {host} cannot be reached; using only locally cached models and data sets")
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_model(name: str, attn_implementation: str | None = None):
    """(tokenizer, model) from 'toy', a local directory or a hub id; never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # our own bars show the long steps; loading 1 file needs none
    if name == "toy":
        import toy

        name = str(toy.sft_model_path())
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        where = "is not a model directory" if Path(name).exists() else "could not be loaded from the Hugging Face Hub"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {name} {where} ({first_line[:200]}); download it where there is network "
                         f"(hf download {name} --local-dir DIR) and pass --model DIR") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere, so any id works
    return tokenizer, model


def pair_logps(model, pairs: list[dict], args) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|x) and log p(y'|x) of a batch of pairs, real and generated in ONE forward pass."""
    device = next(model.parameters()).device
    sequences = [data.build_sequence(p["prompt_ids"], p[key], args.max_prompt_length, args.max_length)
                 for key in ("real_ids", "generated_ids") for p in pairs]
    batch = {k: v.to(device) for k, v in data.collate(sequences, args.pad_token_id).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logps = sequence_logps(logits, batch["labels"])  # (2B,)
    return logps[: len(pairs)], logps[len(pairs):]  # (B,) real, (B,) generated


@torch.no_grad()
def opponent_logps(model, pairs: list[dict], args) -> None:
    """Store log p_θt(y|x) and log p_θt(y'|x) with every pair: the opponent is frozen for the whole
    iteration, so this one pass replaces the reference model that DPO-style trainers keep in memory."""
    model.eval()
    size = args.per_device_train_batch_size
    for start in tqdm(range(0, len(pairs), size), desc="opponent log-probs", unit="batch", disable=True if args.quiet else None):
        batch = pairs[start:start + size]
        real, generated = pair_logps(model, batch, args)
        for p, r, g in zip(batch, real.tolist(), generated.tolist()):
            p["opponent_real_logp"], p["opponent_generated_logp"] = r, g


def train(model, pairs: list[dict], learning_rate: float, iteration: int, args, metrics_file) -> list[dict]:
    """θ_{t+1} = argmin_θ L_SPIN(θ, θ_t), starting from θ = θ_t (the same weights as the opponent)."""
    model.train()
    for module in model.modules():  # dropout would make log p_θ ≠ log p_θt at θ = θ_t
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.RMSprop(model.parameters(), lr=learning_rate, weight_decay=0.0)  # paper §5.1
    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps  # pairs per step
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total_steps = steps_per_epoch * args.num_train_epochs
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # linear warmup, then linear decay; no step runs at lr 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return (total_steps - step) / (total_steps - warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    bar = tqdm(total=total_steps, desc=f"train iteration {iteration}", unit="step", disable=True if args.quiet else None)
    history, step = [], 0
    for epoch in range(args.num_train_epochs):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed + 1000 * iteration + epoch))
        for start in range(0, len(pairs), batch_size):
            started = time.time()
            step_pairs = [pairs[i] for i in order[start:start + batch_size]]
            totals = dict(loss=0.0, real_reward=0.0, generated_reward=0.0, reward_accuracy=0.0)
            tokens = 0
            for micro in range(0, len(step_pairs), args.per_device_train_batch_size):
                batch = step_pairs[micro:micro + args.per_device_train_batch_size]
                policy_real_logps, policy_generated_logps = pair_logps(model, batch, args)  # (b,), (b,)
                losses, real_rewards, generated_rewards = spin_loss(
                    policy_real_logps, policy_generated_logps,
                    torch.tensor([p["opponent_real_logp"] for p in batch], device=policy_real_logps.device),
                    torch.tensor([p["opponent_generated_logp"] for p in batch], device=policy_real_logps.device),
                    args.beta, args.loss_type)
                (losses.sum() / len(step_pairs)).backward()  # the mean over the step's pairs
                totals["loss"] += losses.sum().item()
                totals["real_reward"] += real_rewards.sum().item()
                totals["generated_reward"] += generated_rewards.sum().item()
                totals["reward_accuracy"] += (real_rewards > generated_rewards).float().sum().item()
                tokens += sum(len(p["prompt_ids"]) * 2 + len(p["real_ids"]) + len(p["generated_ids"]) for p in batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {k: v / len(step_pairs) for k, v in totals.items()}
            record["margin"] = record["real_reward"] - record["generated_reward"]
            record.update(iteration=iteration, step=step, epoch=epoch, learning_rate=lr, grad_norm=grad_norm,
                          tokens_per_s=tokens / (time.time() - started))
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:.3f}",
                            acc=f"{record['reward_accuracy']:.2f}", lr=f"{lr:.1e}")
            step += 1
    bar.close()
    return history


def save(model, tokenizer, path: Path) -> None:
    """save_pretrained into a temporary directory, then rename: a model directory is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    run = Path(args.output_dir)
    if (run / "config.json").exists() and not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {run} already holds a run; pass --overwrite_output_dir to replace it")
    if run.exists() and any(run.iterdir()) and not (run / "config.json").exists():
        raise UsageError(f"--output_dir {run} is a non-empty directory that is not a SPIN run; choose another")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Model and data first: bad input fails before anything is written to the run directory.
    go_offline_if_hub_unreachable(args.model, args.dataset)
    tokenizer, model = load_model(args.model, args.attn_implementation)
    args.pad_token_id = tokenizer.pad_token_id
    rows = data.load_rows(args.dataset, args.dataset_split, args.turn)
    if args.max_samples and args.max_samples < len(rows):
        rows = [rows[i] for i in sorted(random.Random(args.seed).sample(range(len(rows)), args.max_samples))]
    prompts = [data.render_prompt(tokenizer, r["messages"]) for r in rows]
    cut = sum(len(p) > args.max_prompt_length for p in prompts)
    prompts = [p[-args.max_prompt_length:] for p in prompts]  # from the left, as in training
    print(f"data: {len(rows)} prompts from {args.dataset}; {cut} prompts longer than --max_prompt_length "
          f"{args.max_prompt_length} were cut from the left")

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    config = {k: v for k, v in vars(args).items()}
    (run / "config.json").write_text(json.dumps(config, indent=1))
    print("SPIN configuration:", json.dumps(config))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    evaluate = toy_evaluator(tokenizer, args) if args.dataset == "toy" else None

    summary = [{"iteration": "start", **(evaluate(model) if evaluate else {})}]
    print_header()
    print_row(summary[-1])
    showcase = {"prompt": rows[0]["messages"][-1]["content"], "human": rows[0]["response"], "model": []}
    previous: list[dict] = []
    metrics_file = open(run / "metrics.jsonl", "a", encoding="utf-8")
    for t in range(args.iters):
        started = time.time()
        # Algorithm 1, line 3: y' ~ p_θt(·|x), sampled from the frozen opponent (the model as it is now)
        samples = gen.generate(model, tokenizer, prompts, args.max_new_tokens, not args.greedy, args.temperature,
                               args.top_p, args.generation_batch_size, args.seed + 1_000_000 * t, progress=not args.quiet)
        # Rows in the official SPIN schema (real/generated conversations) plus the exact token ids.
        pairs = [{"id": r["id"], "iteration": t,
                  "real": r["messages"] + [{"role": "assistant", "content": r["response"]}],
                  "generated": r["messages"] + [{"role": "assistant", "content": s["text"]}],
                  "ended": s["ended"], "prompt_ids": p,
                  "real_ids": data.encode_response(tokenizer, r["response"]), "generated_ids": s["generated_ids"]}
                 for r, s, p in zip(rows, samples, prompts)]
        showcase["model"].append(samples[0]["text"])
        # The paper (§5.1): iteration t ≥ 1 trains on the synthetic data of iterations t−1 and t.
        train_pairs = pairs + (previous if args.mix_previous_iteration else [])
        opponent_logps(model, train_pairs, args)  # log p_θt of every pair, once for the iteration
        (run / f"iter{t}").mkdir(exist_ok=True)
        write_jsonl(run / f"iter{t}" / "synthetic.jsonl", pairs)
        lr = args.learning_rate[min(t, len(args.learning_rate) - 1)]
        history = train(model, train_pairs, lr, t, args, metrics_file)  # θ_{t+1}; the model is now the policy
        save(model, tokenizer, run / f"iter{t}" / "model")
        tail = history[-10:]  # the last 10 steps: one batch alone is noisy
        summary.append({"iteration": t, "pairs": len(train_pairs), "learning_rate": lr, "first_loss": history[0]["loss"],
                        **{k: sum(h[k] for h in tail) / len(tail) for k in ("loss", "margin", "reward_accuracy")},
                        "ended": sum(p["ended"] for p in pairs) / len(pairs),
                        **(evaluate(model) if evaluate else {}), "seconds": round(time.time() - started, 1)})
        with open(run / "iterations.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(summary[-1]) + "\n")
        print_row(summary[-1])
        previous = pairs
    metrics_file.close()
    final = gen.generate(model, tokenizer, prompts[:1], args.max_new_tokens, not args.greedy, args.temperature,
                         args.top_p, 1, args.seed + 1_000_000 * args.iters)
    showcase["model"].append(final[0]["text"])
    print_summary(summary, showcase, run)


def toy_evaluator(tokenizer, args):
    """Held-out metrics of the toy (accuracy, exact distance to p_data): see toy.evaluate."""
    import toy

    test_rows = toy.make_rows("test")
    test_prompts = [data.render_prompt(tokenizer, r["messages"]) for r in test_rows]

    def evaluate(model) -> dict:
        greedy = gen.generate(model, tokenizer, test_prompts, args.max_new_tokens, do_sample=False,
                              batch_size=args.generation_batch_size)
        return toy.evaluate(model, tokenizer, test_rows, greedy)

    return evaluate


COLUMNS = ["iteration", "pairs", "first_loss", "loss", "margin", "reward_accuracy", "accuracy",
           "tv_distance", "valid_mass", "seconds"]


def print_header() -> None:
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)


def print_row(row: dict) -> None:
    cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) and c != "seconds" else str(row.get(c, "")) for c in COLUMNS]
    print("| " + " | ".join(cells) + " |", flush=True)


def print_summary(summary: list[dict], showcase: dict, run: Path) -> None:
    print("\nSPIN, iteration by iteration. loss, margin, reward_accuracy: training, mean of the last 10 steps;"
          "\naccuracy, tv_distance (to p_data), valid_mass: the toy's held-out prompts (see toy.evaluate).")
    print_header()
    for row in summary:
        print_row(row)
    print("\nOne prompt through the iterations (the slide \"Difference in generation at t step\"):")
    print(f"  prompt:  {showcase['prompt']!r}\n  human:   {showcase['human']!r}")
    for t, text in enumerate(showcase["model"]):
        who = "p_θ0 (start)" if t == 0 else f"p_θ{t} (after iteration {t - 1})"
        print(f"  {who:<26} {text!r}")
    print(f"\nrun directory: {run}  (config.json, metrics.jsonl, iterations.jsonl, iter*/synthetic.jsonl, iter*/model)")


if __name__ == "__main__":
    try:
        main()
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
