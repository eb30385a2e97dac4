"""The paper's evaluation with lm-evaluation-harness: the Open LLM Leaderboard (v1) six and their
mean, as arXiv 2401.01335 reports them for zephyr-7b-sft-full and each SPIN iteration, and the
further benchmarks its Section 5 names. Every setting is one row of SETTINGS below, with its
source; docs/evaluation.md shows the same table.

    python -m evals.paper --model runs/spin/iter3/model               # a model directory
    python -m evals.paper --model alignment-handbook/zephyr-7b-sft-full \\
        --revision ac6e600eefcce74f5e8bae1035d4f66019e93190 --bf16       # the SFT start (GPU)
    python spin.py --model zephyr-7b-sft-full --iters 4 --eval_tasks paper --eval_models last

Both print the scores beside the paper's numbers and save lm-eval's full results (scores, task
versions and configs, shots, the harness version). Offline (HF_HUB_OFFLINE=1), each data set is
read from the Hugging Face cache's snapshot (`hf download --repo-type dataset ORG/NAME` where there
is network), since `datasets` does not look there when offline (local_dataset below).
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

GROUP = "spin_paper"  # the lm-eval group that holds the tasks below, with the paper's shots

# The harness the paper's numbers come from: the official SPIN README points to commit 46c79664
# of lm-evaluation-harness and calls it v0.4.0 (`git describe`: v0.4.0-152-g46c796644, i.e. 152
# commits after the v0.4.0 tag, before v0.4.1).
PAPER_HARNESS = ("v0.4.0 (commit 46c796644913cd99da7eee868e64f9ed6af33407, named in the "
                 "official SPIN README)")

# The chat template is NOT applied, and no system prompt is added: the paper's harness commit has
# no chat-template code (no `chat_template` anywhere in its lm_eval/), and the Open LLM
# Leaderboard v1 scored plain prompts. lm-eval's own default is the same
# (apply_chat_template=False); fewshot_as_multiturn only matters with a template.
CHAT_TEMPLATE = {"apply_chat_template": False, "fewshot_as_multiturn": False,
                 "system_instruction": None}

LEADERBOARD_SOURCE = ("paper-notes.md: how the Open LLM Leaderboard (v1), which the paper "
                      "reports, ran each task in lm-evaluation-harness")
NOT_IN_NOTES = "not in paper-notes.md, a choice made here"


@dataclass(frozen=True)
class Setting:
    """One benchmark as the paper's evaluation runs it."""
    column: str  # the printed column and the row key paper/<column>
    task: str  # the lm-eval task (or group) name
    dataset: str  # the Hugging Face data set it reads (its configuration), for offline use
    shots: int  # few-shot examples before each question
    metric: str  # lm-eval's "metric,filter" key of the reported number
    source: str  # where these settings come from


LEADERBOARD = (
    Setting("ARC", "arc_challenge", "allenai/ai2_arc (ARC-Challenge)", 25, "acc_norm,none",
            LEADERBOARD_SOURCE),
    Setting("HellaSwag", "hellaswag", "Rowan/hellaswag", 10, "acc_norm,none", LEADERBOARD_SOURCE),
    Setting("TruthfulQA", "truthfulqa_mc2", "truthfulqa/truthful_qa (multiple_choice)", 0,
            "acc,none", LEADERBOARD_SOURCE + "; mc2, which lm-eval's truthfulqa_mc2 names acc"),
    Setting("MMLU", "mmlu", "cais/mmlu (57 subjects)", 5, "acc,none",
            LEADERBOARD_SOURCE + "; the mean over the 57 subjects, computed here from the "
            "subjects' scores (lm-eval's own mmlu number weights each subject by its number of "
            "questions: mmlu/default/_mmlu.yaml, weight_by_size)"),
    Setting("Winogrande", "winogrande", "allenai/winogrande (winogrande_xl)", 5, "acc,none",
            LEADERBOARD_SOURCE),
    Setting("GSM8k", "gsm8k", "openai/gsm8k (main)", 5, "exact_match,strict-match",
            LEADERBOARD_SOURCE + "; the filter is not in paper-notes.md: strict-match reads "
            "the '#### N' answer, the only filter the paper's harness commit has (there named "
            "get-answer)"),
)
FURTHER = (  # paper-notes.md: "Section 5 adds MT-Bench (GPT-4 as judge), Big-Bench tasks and
    # OpenBookQA"; the three Big-Bench tasks are the ones issue 33 names. MT-Bench: not run here
    # (docs/differences.md).
    *(Setting(f"BBH {name.replace('_', ' ')}", f"bbh_cot_fewshot_{name}", f"SaylorTwift/bbh "
              f"({name})", 3, "exact_match,get-answer",
              "the task: Big-Bench (paper-notes.md), named by issue 33; shots, chain of thought "
              "and metric: " + NOT_IN_NOTES + " (lm-eval's Big-Bench Hard 3-shot "
              "chain-of-thought task, its exact match of the answer after 'the answer is')")
      for name in ("causal_judgement", "sports_understanding", "formal_fallacies")),
    Setting("OpenBookQA", "openbookqa", "allenai/openbookqa (main)", 0, "acc_norm,none",
            "the task: paper-notes.md; shots and metric: " + NOT_IN_NOTES + " (lm-eval's "
            "default 0 shots; acc_norm shown, acc is in the results JSON too)"),
)
SETTINGS = LEADERBOARD + FURTHER

# The paper's Open LLM Leaderboard numbers (percent), from paper-notes.md's "The paper's results"
# table, which issue 33 names as the paper's Table 2. paper-notes.md has no figures for the
# further benchmarks, so none are shown for them.
PAPER_TABLE = "Table 2"
PAPER = {
    "zephyr-7b-sft-full": dict(ARC=60.41, HellaSwag=82.85, TruthfulQA=43.73, MMLU=60.92,
                               Winogrande=74.19, GSM8k=26.76, Average=58.14),
    "SPIN iteration 0": dict(ARC=63.40, HellaSwag=84.38, TruthfulQA=49.18, MMLU=60.03,
                             Winogrande=72.69, GSM8k=35.10, Average=60.80),
    "SPIN iteration 1": dict(ARC=65.19, HellaSwag=84.96, TruthfulQA=55.17, MMLU=59.34,
                             Winogrande=72.30, GSM8k=35.78, Average=62.12),
    "SPIN iteration 2": dict(ARC=65.96, HellaSwag=85.41, TruthfulQA=54.91, MMLU=59.93,
                             Winogrande=73.56, GSM8k=38.06, Average=62.97),
    "SPIN iteration 3": dict(ARC=65.87, HellaSwag=85.54, TruthfulQA=54.90, MMLU=59.99,
                             Winogrande=73.72, GSM8k=38.97, Average=63.16),
}


def local_dataset(dataset: str) -> str | None:
    """The cached snapshot directory of a Hub data set (refs/main), or None. Offline, `datasets`
    5.x raises before it looks in HF_HOME/hub (load.py, dataset_module_factory), but it reads a
    snapshot directory as a local repository, configurations included (its README's `configs`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(dataset.split()[0], repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        return None


def group_spec(offline: bool) -> dict:
    """The lm-eval task spec of SETTINGS: one group whose members are the harness's own task
    definitions with the paper's shots (and, offline, the cached data set's directory)."""
    members = []
    for s in SETTINGS:
        member = {"group" if s.task == "mmlu" else "task": s.task, "num_fewshot": s.shots}
        local = local_dataset(s.dataset) if offline else None
        if local:
            member["dataset_path"] = local
        members.append(member)
    return {"group": GROUP, "task": members}


def short_of_shots(tasks: dict) -> list[str]:
    """A line for each loaded lm-eval task whose few-shot examples are too few for its shots.
    lm-eval's random sampler draws shots + 1 and drops the question itself if drawn
    (api/samplers.py); its first_n sampler (MMLU, BBH) takes the first `shots`."""
    lines = []
    for name, task in tasks.items():
        shots = task.get_config("num_fewshot") or 0
        first_n = getattr(task.config.fewshot_config, "sampler", None) == "first_n"
        needed = shots if first_n or not shots else shots + 1
        have = len(list(task.fewshot_docs())) if shots else 0
        if have < needed:
            lines.append(f"{name} runs {shots}-shot and needs {needed} few-shot examples, its "
                         f"data ({task.get_config('dataset_path')}) has {have}")
    return lines


def under(group_subtasks: dict, name: str) -> list[str]:
    """Every group and task below an lm-eval group in the results' group_subtasks, depth first."""
    return [n for child in group_subtasks.get(name, [])
            for n in [child, *under(group_subtasks, child)]]


def scores(results: dict) -> dict:
    """{"paper/<column>": fraction} from lm-eval's results, and paper/Average, the plain mean of
    the six leaderboard columns. MMLU is the mean over its subjects (see SETTINGS)."""
    out = {}
    for s in SETTINGS:
        if s.task == "mmlu":
            subjects = [t for t in under(results["group_subtasks"], "mmlu")
                        if t not in results["group_subtasks"]]
            out["paper/MMLU"] = sum(results["results"][t][s.metric] for t in subjects) / len(
                subjects)
        else:
            out[f"paper/{s.column}"] = results["results"][s.task][s.metric]
    out["paper/Average"] = sum(out[f"paper/{s.column}"] for s in LEADERBOARD) / len(LEADERBOARD)
    return out


def harness_line(version: str) -> str:
    """The harness version of these scores, the paper's, and whether they differ: one line."""
    same = version in ("0.4.0",)
    return (f"lm-evaluation-harness {version}; the paper's: {PAPER_HARNESS}"
            + ("" if same else " -- a different version: task definitions changed in between "
               "(task versions in the results JSON), so scores may differ from the paper's"))


def table(models: list[tuple[str, dict]], version: str) -> str:
    """The printed comparison: each evaluated model's paper/* scores in percent, the paper's
    numbers below them, then the further benchmarks."""
    six = [s.column for s in LEADERBOARD] + ["Average"]
    further = [s.column for s in FURTHER]

    def line(cells):
        return "| " + " | ".join(cells) + " |"

    def pct(row, column):
        value = row.get(f"paper/{column}")
        return "" if value is None else f"{100 * value:.2f}"

    out = [f"The paper's evaluation (evals/paper.py), {harness_line(version)}",
           line(["model", *six]), "|" + "---|" * (len(six) + 1)]
    out += [line([name, *(pct(row, c) for c in six)]) for name, row in models]
    out += [line([f"paper: {name} ({PAPER_TABLE})", *(f"{paper[c]:.2f}" for c in six)])
            for name, paper in PAPER.items()]
    out += ["", "Further benchmarks (the paper's figures are not in paper-notes.md: none shown)",
            line(["model", *further]), "|" + "---|" * (len(further) + 1)]
    out += [line([name, *(pct(row, c) for c in further)]) for name, row in models]
    return "\n".join(out)


def settings_table() -> str:
    """SETTINGS as a Markdown table (docs/evaluation.md shows it)."""
    rows = ["| column | lm-eval task | data set | shots | metric | source |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {s.column} | `{s.task}` | {s.dataset} | {s.shots} | `{s.metric}` | {s.source} |"
             for s in SETTINGS]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Evaluate one model the way the paper did, without training; print the table."""
    p = argparse.ArgumentParser(prog="python -m evals.paper",
                                description="Evaluate one model as the SPIN paper did (SETTINGS "
                                            "in evals/paper.py), without training, and print the "
                                            "scores beside the paper's.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (a run's iter{t}/model, "
                                                  "LoRA adapters included) or a Hub id")
    p.add_argument("--revision", help="the Hub commit of --model; none: main (a local "
                                      "directory has no revisions)")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated: paper (SETTINGS) and/or any lm-eval task names")
    p.add_argument("--limit", type=int, help="at most this many examples per task (a quick "
                                             "look; the paper's numbers use all)")
    p.add_argument("--batch_size", type=int, default=8, help="lm-eval's batch size")
    p.add_argument("--bf16", action="store_true", help="load the weights in bfloat16 (GPU)")
    p.add_argument("--include_path", help="a directory of lm-eval task YAML files of your own")
    p.add_argument("--output", help="where the results JSON goes; none: "
                                    "./lm_eval_<--model, / written as -->.json")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]

    import json

    import torch

    from machinery import checkpoint, evaluation, models
    from machinery.cli import UsageError

    try:
        evaluation.check_task_names(tasks, args.include_path, "--tasks", "--include_path")
        tokenizer, model = models.load_model(args.model, revision=args.revision,
                                             dtype=torch.bfloat16 if args.bf16 else torch.float32)
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        results = evaluation.run_harness(model, tokenizer, tasks=tasks, limit=args.limit,
                                         batch_size=args.batch_size,
                                         include_path=args.include_path)
    except (UsageError, models.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output or f"lm_eval_{args.model.strip('/').replace('/', '--')}.json")
    results["model"] = {"name": args.model, "revision": args.revision}
    checkpoint.write_atomic(output, json.dumps(results, indent=1, default=str))
    print(evaluation.lm_eval_report(results, args.model))
    print(f"\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
