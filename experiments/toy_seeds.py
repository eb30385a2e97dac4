"""The README's toy table over several seeds: `python spin.py` with --seed 42 (its default), 43 and
44, each column's mean and spread (min to max) per row.

    python -m experiments.toy_seeds               # 3 seeds, ~3 min on 2 CPU cores: runs/toy-seed{s}
    python -m experiments.toy_seeds --seeds 42 43 44 45 46

--seed changes what SPIN draws (the opponent's samples, the training order, the held-out
samples); the start θ_0 is the toy's one weak SFT model, the same for every seed on a given
machine. Another CPU rounds float32 differently, and the SFT warm-up amplifies that: its table
differs in the second decimal."""
import argparse
import json
from pathlib import Path


import spin

COLUMNS = ["loss", "margin", "reward_accuracy", "eval_loss", "eval_margin", "eval_reward_accuracy",
           "eval_real_logp", "eval_generated_length", "accuracy", "tv_distance"]


def rows(run: Path) -> list[dict]:
    start = json.loads((run / "start.json").read_text())
    return [start] + [json.loads(line)
                      for line in (run / "iterations.jsonl").read_text().splitlines()]


def table(runs: list[list[dict]]) -> list[str]:
    """Markdown rows: per iteration, each column as mean [min, max] over the runs."""
    lines = ["| iteration | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for i, first in enumerate(runs[0]):
        cells = []
        for c in COLUMNS:
            values = [r[i][c] for r in runs if c in r[i]]
            cells.append(f"{sum(values) / len(values):.3f} [{min(values):.3f}, "
                         f"{max(values):.3f}]" if values else "")
        lines.append(f"| {first['iteration']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--out", default="runs", help="the run directories go here, as toy-seed{s}")
    args = p.parse_args(argv)
    runs = []
    for s in args.seeds:
        out = Path(args.out) / f"toy-seed{s}"
        # resumes a finished run at once
        spin.main(["--seed", str(s), "--output_dir", str(out), "--quiet"])
        runs.append(rows(out))
    print(f"\nThe toy over seeds {', '.join(map(str, args.seeds))}: mean [min, max] of each column")
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
