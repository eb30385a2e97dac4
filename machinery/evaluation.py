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

`--eval_tasks` adds lm-evaluation-harness scores of θ_s (lm_eval_scores below).
"""
import functools
import json
import random
from pathlib import Path

import torch

from machinery import checkpoint
import data
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
    """lm-evaluation-harness on θ_s, in this process on the loaded model: {"task/metric": value}.
    The full results (versions, configs, stderr) go to `path`; a saved file is reused."""
    if path.exists():
        results = json.loads(path.read_text())
    else:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.generation_batch_size,
                  device=str(next(model.parameters()).device))
        output = lm_eval.simple_evaluate(model=lm, tasks=args.eval_tasks,
                                         task_manager=task_manager(args),
                                         limit=args.eval_limit, log_samples=False,
                                         random_seed=args.seed,
                                         numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                         fewshot_random_seed=args.seed)
        results = {k: output[k] for k in ("results", "versions", "n-shot", "configs")
                   if k in output}
        path.parent.mkdir(exist_ok=True)
        checkpoint.write_atomic(path, json.dumps(results, indent=1, default=str))
    return {f"{task}/{metric.split(',')[0]}": value for task, scores in results["results"].items()
            for metric, value in scores.items()
            if isinstance(value, (int, float)) and "stderr" not in metric
            and metric != "sample_len"}


def task_manager(args):
    """lm-eval's task index: its built-in tasks, this repository's evals/ and
    --eval_include_path."""
    return _task_manager(str(Path(__file__).resolve().parents[1] / "evals"), args.eval_include_path)


@functools.cache  # indexing every task YAML takes ~10 s: once per process
def _task_manager(*paths):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[p for p in paths if p])


def check_tasks(args) -> None:
    """Refuse unknown --eval_tasks before anything is written (indexing lm-eval's tasks takes ~10
    s)."""
    from machinery.cli import UsageError

    known = set(task_manager(args).all_tasks)
    unknown = [t for t in args.eval_tasks if t not in known]
    if unknown:
        raise UsageError(f"--eval_tasks: unknown lm-eval task {unknown[0]!r} (lm_eval ls tasks "
                         f"lists them; local YAML tasks go in evals/ or --eval_include_path)")


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
        samples = sample_and_score(model, tokenizer, heldout, s, previous, args=args,
                                   path=run / "eval" / f"model{s}.jsonl", stop=stop)
        row.update(metrics(samples, previous, args.beta, args.loss_type))
    if args.dataset == "toy":
        # greedy, all 500 prompts in one batch
        row.update(toy_metrics(model, tokenizer, "test", args.max_new_tokens))
    if args.eval_tasks:
        row.update(lm_eval_scores(model, tokenizer, args, run / "eval" / f"lm_eval_model{s}.json"))
    return row
