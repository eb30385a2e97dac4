"""What a run shows its user: the table with one row per model (θ_0 = the start, then one per
iteration), one prompt followed through the iterations (the slide "Difference in generation at t
step" of the presentation this project started from), evaluation.jsonl, the --report_to trackers
(TensorBoard, wandb, trackio) and a model card in every iteration's model directory.
"""
import argparse
import json
import os
import time
import uuid
from pathlib import Path

from machinery import checkpoint
from machinery import cli
import data
from machinery import distributed
from machinery.distributed import print0
from machinery import evaluation
from evals import paper
import generate as gen
from machinery import hub
from machinery import models
from machinery import plot

TRAINING = ["loss", "margin", "reward_accuracy"]  # mean of the iteration's last 10 optimizer steps
HELDOUT = ["eval_loss", "eval_margin", "eval_reward_accuracy", "eval_real_logp",
           "eval_generated_length"]
TOY = ["accuracy", "tv_distance"]


def columns(start: dict) -> list[str]:
    """The table's columns for a run, from what its start row measured."""
    # of the paper's columns only their mean: the whole table follows the run (paper_table)
    tasks = sorted(k for k in start if "/" in k and (not k.startswith("paper/")
                                                     or k == "paper/Average"))
    return (["iteration"] + TRAINING + (HELDOUT if "eval_real_logp" in start else [])
            + (TOY if "accuracy" in start else []) + tasks + ["seconds"])


def print_header(cols: list[str]) -> None:
    print0("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)


def print_row(row: dict, cols: list[str]) -> None:
    cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) and c != "seconds"
             else str(row.get(c, ""))
             for c in cols]
    print0("| " + " | ".join(cells) + " |", flush=True)


def print_summary(summary: list[dict], showcase: dict, run) -> None:
    print0("\nSPIN, iteration by iteration. loss, margin, reward_accuracy: training, mean of the "
           "last 10 steps;\neval_*: the held-out prompts (evaluation.py; eval_loss is Eq. 4.7 of "
           "the model against the one before it)"
          + (";\naccuracy, tv_distance (to p_data): the toy's test prompts "
             "(toy.evaluate)" if "accuracy" in summary[0] else ""))
    cols = columns(summary[0])
    print_header(cols)
    for row in summary:
        print_row(row, cols)
    print0("\nOne prompt through the iterations (the slide \"Difference in generation at t "
           "step\"):")
    print0(f"  prompt:  {showcase['prompt']!r}\n  human:   {showcase['human']!r}")
    for t, text in enumerate(showcase["model"]):
        who = "p_θ0 (start)" if t == 0 else f"p_θ{t} (after iteration {t - 1})"
        print0(f"  {who:<26} {text!r}")
    print0(f"\nrun directory: {run}  (spin.png, evaluation.jsonl, iterations.jsonl, "
           f"iter*/metrics.jsonl, iter*/synthetic.jsonl, iter*/model, eval/)")


def model_name(s: int) -> str:
    """θ_s as the tables name it, with its directory in the run."""
    return "θ_0 (start)" if s == 0 else f"θ_{s} (iter{s - 1}/model)"


def paper_table(models: list[tuple[str, dict]]) -> str | None:
    """The paper's evaluation of the named models that ran it (--eval_tasks paper), beside the
    paper's numbers (evals/paper.py); None if none did."""
    measured = [(name, row) for name, row in models if "paper/Average" in row]
    if not measured:
        return None
    return paper.table(measured, measured[-1][1]["lm_eval_version"])


def paper_card_lines(t: int, start: dict, row: dict) -> list[str]:
    """The model card's part for --eval_tasks paper: this model (and the start, if it was
    evaluated) beside the paper's numbers, with the harness version."""
    compared = paper_table([("θ_0 (start)", start), (f"θ_{t + 1} (this model)", row)])
    return ["The paper's evaluation (--eval_tasks paper, docs/evaluation.md):", "", compared,
            ""] if compared else []


def evaluation_rows(summary: list[dict]) -> list[dict]:
    """One row per model θ_s: what was measured on held-out data (no training numbers)."""
    keep = {"eval_", "accuracy", "tv_distance", "valid_mass", "lm_eval_version"}
    return [{"model": s, "path": "start" if s == 0 else f"iter{s - 1}/model",
             **{k: v for k, v in row.items() if "/" in k or any(k.startswith(p) for p in keep)}}
            for s, row in enumerate(summary)]


def write_evaluation(run: Path, summary: list[dict]) -> None:
    checkpoint.write_jsonl(run / "evaluation.jsonl", evaluation_rows(summary))


class Tracker:
    """Every step's and every held-out evaluation's numbers, also sent to the --report_to trackers:
    TensorBoard event files in <run>/tensorboard; a wandb run (project $WANDB_PROJECT, default
    "spin"; WANDB_MODE=offline keeps it in <run>/wandb); a trackio run (project $TRACKIO_PROJECT,
    default "spin"; a local database in $TRACKIO_DIR unless trackio is pointed at a Space). The
    wandb and trackio runs carry the run's config and an id kept in <run>/tracker_id, so a resumed
    run continues them.

    One step axis for everything: optimizer steps done since the start of the run. Training step k
    of an iteration is logged once it is done (offset + k + 1); model θ_s's held-out numbers at the
    step that finished it (θ_0 at 0). A resumed run redoes the steps after its last saved state:
    TensorBoard purges what the stopped run logged from there on (purge_step); wandb and trackio
    keep both copies of those steps (wandb's charts use "global_step" as their x axis, since its
    own step counter may only grow)."""

    def __init__(self, run: Path, args, config: dict | None = None):
        self.run, self.names, self.config = run, list(args.report_to), config or {}
        # opened at the first number, so that a run that logs nothing creates nothing
        self.sinks = None
        # iteration -> its optimizer steps, read once: an earlier iteration is complete
        self.steps = {}

    def offset(self, iteration: int) -> int:  # optimizer steps of the iterations before this one
        for i in range(iteration):
            if i not in self.steps:
                self.steps[i] = len(checkpoint.read_jsonl(self.run / f"iter{i}" / "metrics.jsonl"))
        return sum(self.steps[i] for i in range(iteration))

    def open(self, step: int) -> dict:
        sinks = {}
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            sinks["tensorboard"] = SummaryWriter(str(self.run / "tensorboard"), purge_step=step)
        if {"wandb", "trackio"} & set(self.names):
            id_file = self.run / "tracker_id"
            if not id_file.exists():
                checkpoint.write_atomic(id_file, uuid.uuid4().hex[:12])
            run_id = id_file.read_text().strip()
            config = {k: v for k, v in self.config.items() if v is not None}
        if "wandb" in self.names:
            import wandb

            sinks["wandb"] = wandb.init(project=os.environ.get("WANDB_PROJECT", "spin"),
                                        name=self.run.name, id=run_id,
                                        resume="allow", dir=str(self.run), config=config)
            sinks["wandb"].define_metric("global_step")
            sinks["wandb"].define_metric("*", step_metric="global_step")
        if "trackio" in self.names:
            import trackio

            sinks["trackio"] = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "spin"),
                                            name=f"{self.run.name}-{run_id}",
                                            config=config, resume="allow", embed=False)
        return sinks

    def scalars(self, values: dict, step: int) -> None:
        if not self.names:
            return
        if self.sinks is None:
            self.sinks = self.open(step)
        if "tensorboard" in self.sinks:
            for tag, value in values.items():
                self.sinks["tensorboard"].add_scalar(tag, value, step)
            self.sinks["tensorboard"].flush()
        if "wandb" in self.sinks:
            self.sinks["wandb"].log({**values, "global_step": step})
        if "trackio" in self.sinks:
            self.sinks["trackio"].log(values, step=step)

    # The same numbers under the names the official SPIN code and TRL log, for dashboards built on
    # them.
    ALSO_AS = {"real_reward": "rewards/real", "generated_reward": "rewards/generated",
               "margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}

    def log_step(self, record: dict) -> None:
        keys = ("loss", "real_reward", "generated_reward", "margin", "reward_accuracy",
                "learning_rate", "grad_norm")
        also = {name: record[k] for k, name in self.ALSO_AS.items()}
        self.scalars({f"train/{k}": record[k] for k in keys} | also,
                     self.offset(record["iteration"]) + record["step"] + 1)

    def log_eval(self, row: dict, s: int) -> None:
        [values] = evaluation_rows([row])
        self.scalars({f"eval/{k.removeprefix('eval_')}": v for k, v in values.items()
                      if isinstance(v, (int, float)) and k != "model"},
                     self.offset(s))

    def close(self) -> None:
        for name, sink in (self.sinks or {}).items():
            sink.close() if name == "tensorboard" else sink.finish()
        self.sinks = None


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(config: dict, row: dict, start: dict) -> str:
    """README.md of iter{t}/model: how θ_{t+1} was made and what it measured."""
    from huggingface_hub import ModelCardData

    t = row["iteration"]
    base = config["model"]
    measured = evaluation_rows([start, row])
    keys = [k for k in measured[1] if k not in ("model", "path") and not k.startswith("paper/")]
    # base_model is the model this one was trained from, θ_t: the start for iteration 0; for later
    # iterations iter{t-1}/model, a local directory, which the Hub metadata cannot name.
    # LoRA adapters on the frozen base `base`, every iteration
    adapter = bool(config.get("use_peft"))
    pairs_per_step = cli.pairs_per_step(argparse.Namespace(**config))
    data = ModelCardData(library_name="peft" if adapter else "transformers",
                         tags=["spin", "self-play-fine-tuning"] + (["lora"] if adapter else []),
                         base_model=base if (t == 0 or adapter) and models.hub_name(base) else None,
                         datasets=[config["dataset"]] if models.hub_name(config["dataset"])
                         else None)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        f"# SPIN iteration {t}: θ_{t + 1}",
        "",
        f"Self-Play Fine-Tuning (arXiv 2401.01335), iteration {t} of {config['iters']}, started "
        f"from `{base}`{' (the embedded toy)' if base == 'toy' else ''}. The opponent of this "
        f"iteration was {'the start' if t == 0 else f'iter{t - 1}/model'}; it sampled one response "
        f"per prompt of `{config['dataset']}`, and this model was trained to tell the human "
        f"responses from those (Eq. 4.7).",
        "",
        "| setting | value |", "|---|---|",
        *([f"| LoRA adapters on the frozen base `{base}` | r {config['lora_r']}, alpha "
           f"{config['lora_alpha']}, modules {' '.join(config['lora_target_modules'])}"
           f"{', base in 4 bits' if config.get('load_in_4bit') else ''} |"] if adapter else []),
        f"| training pairs | {row['pairs']} |",
        f"| λ (--beta) | {config['beta']} |",
        f"| loss ℓ | {config['loss_type']} |",
        f"| learning rate | {row['learning_rate']} |",
        f"| epochs | {config['num_train_epochs']} |",
        f"| pairs per step | {pairs_per_step} |",
        f"| max length / prompt / new tokens | {config['max_length']} / "
        f"{config['max_prompt_length']} / {config['max_new_tokens']} |",
        f"| seed | {config['seed']} |",
        "",
        f"Training, mean of the last 10 steps: loss {row['loss']:.4f} (first step "
        f"{row['first_loss']:.4f}), margin {row['margin']:.4f}, reward accuracy "
        f"{row['reward_accuracy']:.4f}.",
        "",
        "Held-out evaluation (prompts never trained on; evaluation.py), this model against the "
        "start:",
        "",
        "| metric | start | this model |", "|---|---|---|",
        *[f"| {k} | {fmt(measured[0].get(k, ''))} | {fmt(measured[1][k])} |" for k in keys],
        "",
        *paper_card_lines(t, start, row),
        "The full configuration is the run's config.json:",
        "",
        "```json", json.dumps(config, indent=1), "```", "",
    ]
    return "\n".join(lines)


class Report:
    """Rank 0's account of a run: θ_0's held-out numbers, then after every iteration its row
    (printed, model card, evaluation.jsonl, spin.png, TensorBoard), and the summary at the end.
    It reports only: the markers a resumed run reads are the run directory's
    (machinery/rundir.py). Evaluation runs on rank 0 alone (a whole copy of the model); the other
    ranks wait for it."""

    def __init__(self, run: Path, args, config: dict, tokenizer, run_data):
        self.run, self.args, self.config = run, args, config
        self.tokenizer, self.data = tokenizer, run_data
        self.rank0 = args.rank == 0
        self.tracker = Tracker(run, args, config) if self.rank0 else None
        self.started = time.time()
        self.drawn = None  # the summary rows spin.png shows, when this process drew it

    def start(self, model, completed: int) -> None:
        """θ_0's held-out numbers (measured once per run), and the rows of the iterations already
        done."""
        measured = self.rank0 and not (self.run / "start.json").exists()
        if measured:
            start = {"iteration": "start", **self.evaluate(model, 0)}
            checkpoint.write_atomic(self.run / "start.json", json.dumps(start))
        distributed.barrier()
        if not self.rank0:
            return
        self.summary = [json.loads((self.run / "start.json").read_text())] + \
            [json.loads((self.run / f"iter{t}" / "complete.json").read_text())
             for t in range(completed)]
        self.cols = columns(self.summary[0])
        print_header(self.cols)
        for row in self.summary:
            print_row(row, self.cols)
        # logged once: a resumed run's first new event is a redone step
        if self.tracker and measured:
            self.tracker.log_eval(self.summary[0], 0)
        for t in range(completed):  # --push_to_hub: iterations completed before an upload happened
            hub.push(self.args, self.run, t)

    def evaluate(self, model, s: int) -> dict:
        return evaluation.evaluate(model, self.tokenizer, s=s, heldout=self.data.heldout,
                                   args=self.args, run=self.run, stop=self.data.stop)

    def log_step(self, record: dict) -> None:
        if self.tracker:
            self.tracker.log_step(record)

    def begin_iteration(self, t: int) -> None:
        """What a stopped run measured of θ_{t+1} is stale: training runs again."""
        self.started = time.time()
        if self.rank0:
            for stale in (self.run / "eval" / f"model{t + 1}.jsonl",
                          self.run / "eval" / f"lm_eval_model{t + 1}.json"):
                stale.unlink(missing_ok=True)

    def end_iteration(self, t: int, model, pairs: list[dict], train_pairs: list[dict],
                      history: list[dict], learning_rate: float) -> dict:
        """θ_{t+1}'s row: measured, printed, logged, drawn, carded (and pushed with
        --push_to_hub) on rank 0, returned on every rank (the caller marks the iteration complete
        with it)."""
        row = None
        if self.rank0:
            args, it = self.args, self.run / f"iter{t}"
            tail = history[-10:]  # the last 10 steps: one batch alone is noisy
            seed = data.seed(args.seed, "samples", t + 1)
            [after] = gen.generate(model, self.tokenizer, self.data.prompts[:1],
                                   gen.Sampling.of_run(args), seed, stop=self.data.stop)
            row = {"iteration": t, "pairs": len(train_pairs), "learning_rate": learning_rate,
                   "first_loss": history[0]["loss"],
                   **{k: sum(h[k] for h in tail) / len(tail)
                      for k in ("loss", "margin", "reward_accuracy")},
                   "ended": sum(p["ended"] for p in pairs) / len(pairs),
                   **self.evaluate(model, t + 1), "seconds": round(time.time() - self.started, 1),
                   "sample": pairs[0]["generated"][-1]["content"], "sample_after": after["text"]}
            checkpoint.write_atomic(it / "model" / "README.md",
                                    model_card(self.config, row, self.summary[0]))
            print_row(row, self.cols)
            self.summary.append(row)
            self.tracker.log_eval(row, t + 1)
            write_evaluation(self.run, self.summary)
            plot.draw(self.run)
            self.drawn = len(self.summary)
            hub.push(args, self.run, t)  # --push_to_hub: the model, its card, the plot
        return distributed.broadcast(row)  # the other ranks wait here for rank 0's evaluation

    def finish(self) -> None:
        if not self.rank0:
            return
        # a run directory may hold more iterations than --iters
        summary = self.summary[:self.args.iters + 1]
        checkpoint.write_jsonl(self.run / "iterations.jsonl", summary[1:])
        write_evaluation(self.run, summary)
        if self.drawn != len(summary):  # the last iteration's drawing already shows these rows
            plot.draw(self.run)
        self.tracker.close()
        row = self.data.rows[0]
        showcase = {"prompt": row["messages"][-1]["content"], "human": row["response"],
                    "model": [s["sample"] for s in summary[1:]] + [summary[-1]["sample_after"]]}
        print_summary(summary, showcase, self.run)
        compared = paper_table([(model_name(s), row) for s, row in enumerate(summary)])
        if compared:
            print0("\n" + compared)
