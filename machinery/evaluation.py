"""Held-out evaluation of every model a run makes: θ_0 (the start) and θ_{t+1} after iteration t.

Not an extra part of the method: a measurement of it on prompts that training never sees.
For the model θ_s and every held-out prompt x with its human response y:

    y'_s ~ p_θs(·|x)                     sampled as in training (temperature, top_p, max_new_tokens)
    log p_θs(y|x), log p_θs(y'_s|x)      stored in <run>/eval/model{s}.jsonl

Then, for s ≥ 1, the SPIN objective of the iteration that made θ_s, on unseen prompts: its main
player f = λ·log(p_θs/p_θ{s−1}) scores y against y'_{s−1} ~ p_θ{s−1}, the opponent it was trained
to tell apart from the human (Eq. 4.7):

    eval_loss              mean ℓ(f(x, y) − f(x, y'_{s−1}))  (ℓ(0) = log 2: "no difference found")
    eval_real_reward       mean f(x, y);  eval_generated_reward: mean f(x, y'_{s−1})
    eval_margin            their difference
    eval_reward_accuracy   fraction with f(x, y) > f(x, y'_{s−1})

and for every s:

    eval_real_logp             mean over prompts of log p_θs(y|x)
    eval_real_logp_per_token   Σ log p_θs(y|x) / Σ |y|
    eval_real_length, eval_generated_length   mean tokens of y and of y'_s
    eval_ended                 fraction of y'_s that ended on a stop id (others: max_new_tokens)

`--eval_tasks` adds lm-evaluation-harness scores of the models `--eval_models` names
(lm_eval_scores below); `--eval_tasks paper` is the paper's evaluation, its settings in
evals/paper.py.
"""
import functools
import json
import random
from pathlib import Path

import torch

from machinery import checkpoint
from machinery.distributed import print0
import data
from evals import paper
import generate as gen
import toy
from machinery.logps import Scoring, score_all
from loss import spin_loss


def heldout_rows(rows: list[dict], args) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows). The held-out prompts come from --eval_dataset (the toy: its
    test split) or, without one, are --eval_samples rows (at most a tenth) taken out of the data."""
    if not args.eval_samples:
        return rows, []
    source = args.eval_dataset or ("toy" if args.dataset == "toy" else None)
    if source:
        same = source == args.dataset  # the same data set: the same revision and configuration
        held = data.load_rows(source, args.eval_split, args.turn, "--eval_dataset",
                              args.dataset_revision if same else None,
                              args.dataset_config if same else None)
        return rows, data.subsample(held, args.eval_samples, args.seed)
    n = min(args.eval_samples, len(rows) // 10)
    chosen = set(random.Random(args.seed).sample(range(len(rows)), n))
    return ([r for i, r in enumerate(rows) if i not in chosen],
            [r for i, r in enumerate(rows) if i in chosen])


def score(model, prompts: list[list[int]], responses: list[list[int]], args,
          desc: str) -> list[tuple[float, int]]:
    """(log p(response|prompt), scored tokens) for each pair, cut as in training
    (data.build_sequence)."""
    return score_all(model, prompts, responses, Scoring.of_run(args),
                     batch_size=args.per_device_train_batch_size, desc=desc,
                     progress=not args.quiet)


def sample_and_score(model, tokenizer, heldout: dict, s: int, previous: list[dict] | None, args,
                     path: Path, stop: list[int] | None = None) -> list[dict]:
    """eval/model{s}.jsonl: y'_s ~ p_θs for every held-out prompt and the log-probs under θ_s that
    the metrics need (also of y'_{s−1}, the previous model's samples). Reused when already saved."""
    saved = checkpoint.read_jsonl(path)
    if len(saved) == len(heldout["prompts"]):
        return saved
    prompts, real_ids = heldout["prompts"], heldout["real_ids"]
    samples = gen.generate(model, tokenizer, prompts, gen.Sampling.of_run(args),
                           data.seed(args.seed, "heldout", s), progress=not args.quiet, stop=stop)
    real = score(model, prompts, real_ids, args, f"eval θ{s}: log p(y)")
    generated = score(model, prompts, [g["generated_ids"] for g in samples], args,
                      f"eval θ{s}: log p(y')")
    rows = [{"id": r["id"], "text": g["text"], "generated_ids": g["generated_ids"],
             "ended": g["ended"],
             "real_logp": lp, "real_tokens": n, "generated_logp": glp, "real_length": len(y)}
            for r, g, (lp, n), (glp, _), y in zip(heldout["rows"], samples, real, generated,
                                                  real_ids)]
    if previous is not None:  # log p_θs(y'_{s−1}): the policy's side of the held-out SPIN loss
        before = score(model, prompts, [p["generated_ids"] for p in previous], args,
                       f"eval θ{s}: log p(y' of θ{s - 1})")
        for row, (lp, _) in zip(rows, before):
            row["previous_generated_logp"] = lp
    path.parent.mkdir(exist_ok=True)
    checkpoint.write_jsonl(path, rows)
    return rows


def metrics(samples: list[dict], previous: list[dict] | None, beta: float, loss_type: str) -> dict:
    """The held-out numbers of θ_s from its samples file (and θ_{s−1}'s, for the SPIN loss)."""
    n = len(samples)
    out = {"eval_prompts": n,
           "eval_real_logp": sum(r["real_logp"] for r in samples) / n,
           "eval_real_logp_per_token": sum(r["real_logp"] for r in samples)
           / sum(r["real_tokens"] for r in samples),
           "eval_real_length": sum(r["real_length"] for r in samples) / n,
           "eval_generated_length": sum(len(r["generated_ids"]) for r in samples) / n,
           "eval_ended": sum(r["ended"] for r in samples) / n}
    if previous is not None:
        def column(rows, key):
            return torch.tensor([r[key] for r in rows], dtype=torch.float64)
        losses, real_rewards, generated_rewards = spin_loss(
            column(samples, "real_logp"), column(samples, "previous_generated_logp"),  # policy θ_s
            column(previous, "real_logp"), column(previous, "generated_logp"),  # opponent θ_{s−1}
            beta, loss_type)
        out.update(eval_loss=losses.mean().item(), eval_real_reward=real_rewards.mean().item(),
                   eval_generated_reward=generated_rewards.mean().item(),
                   eval_margin=(real_rewards - generated_rewards).mean().item(),
                   eval_reward_accuracy=(real_rewards > generated_rewards).double().mean().item())
    return out


def lm_eval_scores(model, tokenizer, args, path: Path) -> dict:
    """lm-evaluation-harness on θ_s, in this process on the loaded model: {"task/metric": value},
    and for --eval_tasks paper {"paper/<column>": value} (evals/paper.py). The full results
    (scores, task versions and configs, shots, the harness version) go to `path`; a saved file is
    reused."""
    if path.exists():
        results = json.loads(path.read_text())
    else:
        results = run_harness(model, tokenizer, tasks=args.eval_tasks, limit=args.eval_limit,
                              batch_size=args.generation_batch_size,
                              include_path=args.eval_include_path)
        path.parent.mkdir(exist_ok=True)
        checkpoint.write_atomic(path, json.dumps(results, indent=1, default=str))
    # a results file saved before the harness version was recorded has none
    return {**flat_scores(results), "lm_eval_version": results.get("harness", {}).get("lm_eval")}


def run_harness(model, tokenizer, *, tasks: list[str], limit: int | None, batch_size: int,
                include_path: str | None = None) -> dict:
    """lm-evaluation-harness on a loaded model (spin.py's θ_s, or evals/paper.py's --model):
    `tasks` are lm-eval task names and/or "paper", the group of evals/paper.py's SETTINGS. The
    chat template is not applied (paper.CHAT_TEMPLATE); the seeds are lm-eval's defaults, which
    the paper's harness had too (random 0; numpy, torch and the few-shot sampler 1234)."""
    import importlib.metadata

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs = [paper_group(include_path) if t == "paper" else t for t in tasks]
    # transformers lets a max_new_tokens of the model's generation_config.json win over the
    # max_length lm-eval passes (generation/utils.py): say so, generated answers are cut there
    cap = model.generation_config.max_new_tokens
    if cap:
        print0(f"note: the model's generation_config sets max_new_tokens={cap}: lm-eval's "
               f"generated answers (GSM8k, BBH) stop after {cap} tokens, not at the task's "
               f"max_gen_toks")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(next(model.parameters()).device))
    output = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=_task_manager(
        str(EVALS), include_path), limit=limit, log_samples=False, **paper.CHAT_TEMPLATE)
    results = {k: output[k] for k in ("results", "group_subtasks", "versions", "n-shot",
                                      "n-samples", "configs") if k in output}
    results["harness"] = {"lm_eval": importlib.metadata.version("lm_eval"),
                          "paper": paper.PAPER_HARNESS, **paper.CHAT_TEMPLATE,
                          "seeds": "lm-eval's defaults", "limit": limit,
                          "model_max_new_tokens": cap}
    return results


def flat_scores(results: dict) -> dict:
    """{"task/metric": value} of every task outside the paper's group, and the paper's columns."""
    groups = results.get("group_subtasks", {})
    paper_names = set(paper.under(groups, paper.GROUP)) if paper.GROUP in groups else set()
    out = {f"{task}/{metric.split(',')[0]}": value
           for task, scores in results["results"].items() if task not in paper_names
           for metric, value in scores.items()
           if isinstance(value, (int, float)) and "stderr" not in metric
           and metric != "sample_len"}
    return {**out, **(paper.scores(results) if paper_names else {})}


def lm_eval_report(results: dict, name: str) -> str:
    """What evals/paper.py prints for one model: the paper's table, and any other task's scores."""
    scores = flat_scores(results)
    lines = [f"{k}: {v:.4f}" for k, v in scores.items() if not k.startswith("paper/")]
    if any(k.startswith("paper/") for k in scores):
        lines.append(paper.table([(name, scores)], results["harness"]["lm_eval"]))
    return "\n".join(lines)


EVALS = Path(__file__).resolve().parents[1] / "evals"  # this repository's lm-eval tasks


@functools.cache  # indexing every task YAML takes ~10 s: once per process
def _task_manager(*paths):
    """lm-eval's task index: its built-in tasks, this repository's evals/ and an include path
    (--eval_include_path)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[p for p in paths if p])


@functools.cache  # loading its ~65 data sets: once per process (checked at the start, then run)
def paper_group(include_path: str | None = None):
    """The loaded lm-eval group of evals/paper.py's SETTINGS; refused with one line if a task's
    data has fewer few-shot examples than the paper's shots."""
    import datasets
    from lm_eval.tasks._index import TaskIndex
    from machinery.cli import UsageError

    manager = _task_manager(str(EVALS), include_path)
    # Registered by name rather than passed as a dict: lm-eval 0.4.13 hands a top-level dict's own
    # `task` list down to a member group's subtasks as their name (tasks/_factory.py, build).
    manager.task_index[paper.GROUP] = TaskIndex.entry_from_config(
        paper.group_spec(offline=datasets.config.HF_HUB_OFFLINE))
    loaded = manager.load([paper.GROUP])
    short = paper.short_of_shots(loaded["tasks"])
    if short:
        raise UsageError(f"--eval_tasks paper: {short[0]}" + (f" (and {len(short) - 1} more "
                                                               f"tasks)" if len(short) > 1 else ""))
    return loaded["groups"][paper.GROUP]


def check_task_names(tasks: list[str], include_path: str | None, flag: str,
                     include_flag: str = "--eval_include_path") -> None:
    """Refuse unknown task names before anything is written (indexing lm-eval's tasks takes ~10
    s); "paper" is loaded here, so that missing data is said before training, not after."""
    from machinery.cli import UsageError

    known = set(_task_manager(str(EVALS), include_path).all_tasks) | {"paper"}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UsageError(f"{flag}: unknown lm-eval task {unknown[0]!r} (lm_eval ls tasks "
                         f"lists them; local YAML tasks go in evals/ or {include_flag})")
    if "paper" in tasks:
        paper_group(include_path)


def check_tasks(args) -> None:
    """spin.py's --eval_tasks, checked before anything is written."""
    check_task_names(args.eval_tasks, args.eval_include_path, "--eval_tasks")


def evaluated(s: int, args) -> bool:
    """Whether --eval_models names θ_s (0: the start; args.iters: the last)."""
    names = set(args.eval_models)
    return bool("all" in names or str(s) in names or (s == 0 and "start" in names)
                or (s == args.iters and "last" in names))


def toy_metrics(model, tokenizer, split: str = "test", max_new_tokens: int = 16,
                batch_size: int = 500) -> dict:
    """The toy's task metrics on a split's prompts, from the model's greedy answers to them:
    accuracy, exact distance to p_data (toy.evaluate)."""
    rows = data.toy_rows(split)
    chat = data.ChatFormat(tokenizer)
    greedy = gen.generate(model, tokenizer, [chat.prompt_ids(r["messages"]) for r in rows],
                          gen.Sampling(max_new_tokens, do_sample=False, batch_size=batch_size))
    return toy.evaluate(model, tokenizer, rows, greedy)


def evaluate(model, tokenizer, s: int, heldout: dict, args, run: Path,
             stop: list[int] | None = None) -> dict:
    """Everything measured about θ_s on data that training never sees, as one flat row."""
    row = {}
    if heldout["rows"]:
        previous = checkpoint.read_jsonl(run / "eval" / f"model{s - 1}.jsonl") if s else None
        samples = sample_and_score(model, tokenizer, heldout, s=s, previous=previous, args=args,
                                   path=run / "eval" / f"model{s}.jsonl", stop=stop)
        row.update(metrics(samples, previous, args.beta, args.loss_type))
    if args.dataset == "toy":
        # greedy, all 200 test prompts (data.TOY_TEST) in one batch of up to 500
        row.update(toy_metrics(model, tokenizer, "test", args.max_new_tokens))
    if args.eval_tasks and evaluated(s, args):
        row.update(lm_eval_scores(model, tokenizer, args, run / "eval" / f"lm_eval_model{s}.json"))
    return row
