"""Evidence on the toy for the paper's claims (arXiv 2401.01335v3, Sections 5 and 6):
(a) SPIN improves a weak SFT model using only its SFT data; (b) the gains shrink from iteration to
iteration; (c) continuing SFT on the same data for as many optimizer steps does not give the same
gains; (d) p_data is the fixed point (Theorem 5.2) and each ideal step moves p_t to
p_t·(p_data/p_t)^{1/λ} (Theorem 5.4, checked exactly in tests/test_theory.py).

    python -m experiments.toy_evidence           # 3 seeds, 4 iterations: ~15 min on 2 CPU cores
    python -m experiments.toy_evidence --fast    # 1 seed, 2 iterations, 512 prompts: what CI runs
    python -m experiments.toy_evidence --plateau --out runs/evidence-plateau
                                                 # claim (c) from a plateaued start

Protocol, fixed before the final runs: λ and the learning rate of SPIN, and the learning rate of
continued SFT, are chosen on the VALIDATION prompts (data.toy_rows("validation")) with seed 0 and
2 iterations, by the lowest distance to p_data; the final runs then report the TEST prompts,
which the choice never sees. Writes <out>/results.json, <out>/results.md and <out>/results.png.
"""
import argparse
import json
import statistics
import time
from pathlib import Path


from machinery import checkpoint
import data
from machinery import evaluation
from machinery import models
import spin
import toy
from experiments.continued_sft import ContinuedSFT, draw_both, mean_std

SPIN_GRID = [(beta, lr) for beta in (0.5, 1.0, 2.0) for lr in (3e-5, 1e-4, 3e-4)]
SFT_GRID = [3e-5, 1e-4, 3e-4]
BATCH = 64  # pairs per SPIN step and sequences per SFT step: the toy recipe's


def run_spin(start: Path, out: Path, beta: float, lr: float, iters: int, seed: int, split: str,
             max_samples: int | None = None) -> list[dict]:
    """SPIN through spin.main; then each iteration's saved model evaluated on `split`."""
    spin.main([*(["--max_samples", str(max_samples)] if max_samples else []),
               "--model", str(start), "--dataset", "toy", "--iters", str(iters), "--beta",
               str(beta),
               "--learning_rate", str(lr), "--seed", str(seed), "--quiet", "--output_dir", str(out),
               "--max_length", "48", "--max_prompt_length", "32", "--max_new_tokens", "16",
               "--generation_batch_size", "500", "--per_device_train_batch_size", str(BATCH),
               "--no-group_by_length",  # shuffled steps, as continued SFT's
               # padded rows, as docs/results.md's runs had (packing came later: equal to rounding)
               "--no-padding_free"])
    results = []
    for t in range(iters):
        row = json.loads((out / f"iter{t}" / "complete.json").read_text())
        if split == "test":  # spin.main evaluated the test prompts already
            steps = len(checkpoint.read_jsonl(out / f"iter{t}" / "metrics.jsonl"))
            results.append({k: row[k]
                            for k in ("accuracy", "tv_distance", "valid_mass", "first_loss")}
                           | {"steps": steps})
        else:
            tokenizer, model = models.load_model(str(out / f"iter{t}" / "model"))
            results.append(evaluation.toy_metrics(model, tokenizer, split))
    return results


def run_sft(start: Path, steps: list[int], lr: float, seed: int, split: str) -> list[dict]:
    """Continued SFT from the same start on the same prompts and human answers, with the same
    optimizer, schedule shape and number of optimizer steps as each SPIN iteration."""
    tokenizer, model = models.load_model(str(start))
    chat = data.ChatFormat(tokenizer)
    sequences = [data.build_sequence(*chat.pair(r["messages"], r["response"]), 32, 48)
                 for r in data.toy_rows("train")]
    sft = ContinuedSFT(model, sequences, BATCH, seed)
    results = []
    for total in steps:
        sft.run(total, lr)
        results.append(evaluation.toy_metrics(model, tokenizer, split) | {"steps": total})
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--fast", action="store_true",
                   help="1 seed, 2 iterations, 512 of the 2000 prompts, a 1-point grid and so no "
                        "protocol runs: for CI")
    p.add_argument("--plateau", action="store_true",
                   help="start from an SFT model trained until doubling its steps no longer lowers "
                        "the validation TV by 0.01 (plateau_steps), instead of the weak 400-step "
                        "start")
    p.add_argument("--out", default="runs/evidence")
    args = p.parse_args(argv)
    if args.fast:
        args.seeds, args.iters = [0], 2
    spin_grid = [(1.0, 1e-4)] if args.fast else SPIN_GRID
    sft_grid = [1e-4] if args.fast else SFT_GRID
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # 1. The protocol: choose on validation prompts, seed 0, 2 iterations.
    curve, sft_steps = plateau_steps() if args.plateau else ([], toy.SFT["sft_steps"])
    start0 = toy.sft_model_path(seed=0, sft_steps=sft_steps)
    protocol, best, best_sft = choose(start0, spin_grid, sft_grid, out)
    print(f"chosen before the final runs: SPIN λ={best['beta']} lr={best['learning_rate']:g}; "
          f"continued SFT lr={best_sft['learning_rate']:g}", flush=True)

    # 2. The final runs on the test prompts.
    runs = []
    for seed in args.seeds:
        start = toy.sft_model_path(seed=seed, sft_steps=sft_steps)
        tokenizer, model = models.load_model(str(start))
        initial = evaluation.toy_metrics(model, tokenizer, "test")
        spin_results = run_spin(start, out / f"seed{seed}-spin", best["beta"],
                                best["learning_rate"], args.iters,
                                seed, "test", 512 if args.fast else None)
        sft_results = run_sft(start, [r["steps"] for r in spin_results], best_sft["learning_rate"],
                              seed, "test")
        runs.append({"seed": seed, "start": initial, "spin": spin_results, "sft": sft_results})
        print(f"seed {seed}: start TV {initial['tv_distance']:.4f}; SPIN TV "
              f"{[round(r['tv_distance'], 4) for r in spin_results]}; continued SFT TV "
              f"{[round(r['tv_distance'], 4) for r in sft_results]}", flush=True)

    minutes = (time.time() - started) / 60
    results = {"sft_steps": sft_steps, "sft_curve": curve, "protocol": protocol,
               "chosen": {"spin": best, "sft": best_sft}, "runs": runs,
               "iters": args.iters, "seeds": args.seeds, "minutes": round(minutes, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(results, out / "results.png")
    print(table(results))
    print(f"{minutes:.1f} min; wrote {out}/results.json, results.md, results.png")


def choose(start0: Path, spin_grid: list, sft_grid: list, out: Path) -> tuple[dict, dict, dict]:
    """The protocol: each grid point on the validation prompts, seed 0, 2 iterations; the best
    SPIN (λ, learning rate) and continued-SFT learning rate by validation TV."""
    protocol = {"spin": [], "sft": []}
    # a one-point grid (--fast) has nothing to choose
    for beta, lr in spin_grid if len(spin_grid) > 1 else []:
        tv = run_spin(start0, out / f"protocol-spin-b{beta}-lr{lr}", beta, lr, 2, 0,
                      "validation")[-1]["tv_distance"]
        protocol["spin"].append({"beta": beta, "learning_rate": lr, "validation_tv": tv})
        print(f"protocol: SPIN λ={beta} lr={lr:g}: validation TV {tv:.4f}", flush=True)
    for lr in sft_grid if len(sft_grid) > 1 else []:
        first_spin = out / f"protocol-spin-b{spin_grid[0][0]}-lr{spin_grid[0][1]}"
        spin_steps = [len(checkpoint.read_jsonl(first_spin / f"iter{t}" / "metrics.jsonl"))
                      for t in range(2)]
        tv = run_sft(start0, spin_steps, lr, 0, "validation")[-1]["tv_distance"]
        protocol["sft"].append({"learning_rate": lr, "validation_tv": tv})
        print(f"protocol: continued SFT lr={lr:g}: validation TV {tv:.4f}", flush=True)
    best = min(protocol["spin"], key=lambda r: r["validation_tv"]) if protocol["spin"] else \
        {"beta": spin_grid[0][0], "learning_rate": spin_grid[0][1], "validation_tv": None}
    best_sft = min(protocol["sft"], key=lambda r: r["validation_tv"]) if protocol["sft"] else \
        {"learning_rate": sft_grid[0], "validation_tv": None}
    return protocol, best, best_sft


def plateau_steps() -> tuple[list[dict], int]:
    """The SFT start's curve (seed 0): SFT steps doubled from 400 until the validation TV of the
    start improves by less than 0.01; the start is the last step count before that doubling."""
    curve = []
    for steps in (400, 800, 1600, 3200, 6400, 12800):
        tokenizer, model = models.load_model(str(toy.sft_model_path(seed=0, sft_steps=steps)))
        curve.append({"sft_steps": steps, **evaluation.toy_metrics(model, tokenizer, "validation")})
        print(f"SFT start: {steps} steps, validation TV {curve[-1]['tv_distance']:.4f}, accuracy "
              f"{curve[-1]['accuracy']:.3f}", flush=True)
        if len(curve) > 1 and curve[-2]["tv_distance"] - curve[-1]["tv_distance"] < 0.01:
            return curve, curve[-2]["sft_steps"]
    return curve, curve[-1]["sft_steps"]


def series(results: dict, method: str, metric: str) -> list[list[float]]:
    """[iteration][seed] values, iteration 0 being the common start."""
    return [[r["start"][metric] for r in results["runs"]]] + [
        [r[method][t][metric] for r in results["runs"]] for t in range(results["iters"])]


def table(results: dict) -> str:
    lines = ["| after iteration | SPIN accuracy | SPIN TV to p_data | SPIN Δ TV | "
             "continued SFT accuracy | continued SFT TV to p_data | optimizer steps |",
             "|---|---|---|---|---|---|---|"]
    spin_acc, spin_tv = series(results, "spin", "accuracy"), series(results, "spin", "tv_distance")
    sft_acc, sft_tv = series(results, "sft", "accuracy"), series(results, "sft", "tv_distance")
    for t in range(results["iters"] + 1):
        mean_tv = statistics.mean(spin_tv[t])
        delta = "" if t == 0 else f"{mean_tv - statistics.mean(spin_tv[t - 1]):+.3f}"
        steps = "" if t == 0 else str(results["runs"][0]["spin"][t - 1]["steps"])
        lines.append(f"| {'start' if t == 0 else t - 1} | {mean_std(spin_acc[t])} | "
                     f"{mean_std(spin_tv[t])} | {delta} | {mean_std(sft_acc[t])} | "
                     f"{mean_std(sft_tv[t])} | {steps} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "accuracy", "held-out accuracy (greedy answer valid)"),
                              (axes[1], "tv_distance", "total variation to p_data")):
        draw_both(ax, results["iters"], lambda method: series(results, method, metric))
        ax.set_title(label)
        ax.legend()
    fig.suptitle(f"Toy: SPIN vs continued SFT, {len(results['seeds'])} seed(s), test prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
