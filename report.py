"""What a run shows its user: the per-iteration table and one prompt followed through the
iterations (the slide "Difference in generation at t step" of the presentation this project
started from). On the toy, the held-out task metrics come from toy.evaluate.
"""
COLUMNS = ["iteration", "pairs", "first_loss", "loss", "margin", "reward_accuracy", "accuracy",
           "tv_distance", "valid_mass", "seconds"]


def toy_evaluator(args):
    """Held-out metrics of the toy (accuracy, exact distance to p_data): see toy.evaluate."""
    import toy

    return lambda model, tokenizer: toy.evaluate_split(model, tokenizer, "test", args.max_new_tokens,
                                                       args.generation_batch_size)


def print_header() -> None:
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)


def print_row(row: dict) -> None:
    cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) and c != "seconds" else str(row.get(c, ""))
             for c in COLUMNS]
    print("| " + " | ".join(cells) + " |", flush=True)


def print_summary(summary: list[dict], showcase: dict, run) -> None:
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
    print(f"\nrun directory: {run}  (config.json, iterations.jsonl, iter*/synthetic.jsonl, iter*/metrics.jsonl, "
          f"iter*/model)")
