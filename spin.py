"""SPIN, Algorithm 1 of arXiv 2401.01335v3 (Self-Play Fine-Tuning), as one visible loop; the
numbers on the left are the paper's lines of Algorithm 1 (2 to 4: for i, generate, end for).

    1    for t in 0 .. iters-1:
    2-4      y' ~ p_θt(·|x) for every prompt x of the SFT data    (sample_pairs: frozen opponent)
             log p_θt(y|x), log p_θt(y'|x), once per iteration    (opponent_pass: no second model)
    5        θ_{t+1} = argmin_θ L_SPIN(θ, θ_t) on (x, y, y')      (train: loss.py, Eq. 4.7)
    6        θ_{t+1} is the next opponent                         (end for)

    python spin.py                                        # the embedded toy, offline, CPU, ~2 min
    python spin.py --model zephyr-7b-sft-full --iters 4   # the paper's recipe (GPUs)
    python spin.py --model PATH_OR_HUB_ID --dataset data.jsonl --output_dir runs/mine

The paper's pieces are the files beside this one (generate.py, loss.py, data.py); what it takes to
run them for real (flags, the run directory and resume, ranks and ZeRO-3, the fast log-prob path,
evaluation, reporting) is the package machinery/, which this loop calls by name.

Re-running the same command resumes its run directory, --output_dir (machinery/rundir.py).
"""
import gc
import math
import random
import sys
import time
from pathlib import Path

import torch

import data
import generate as gen
from loss import spin_loss
from machinery import adapters, backends, distributed, preemption
from machinery.cli import pairs_per_step, parse_args, run_config, run_main
from machinery.distributed import print0
from machinery.logps import Scoring, score
from machinery.models import load_model
from machinery.prepare import prepare, redraw, weights_dtype
from machinery.report import Report
from machinery.rundir import RunDir
from machinery.steps import Steps


def pair_batch(pairs: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """The one layout of a batch of B pairs, for the opponent pass and for training alike:
    2B rows, the B real responses y first, then the B generated y' in the same order."""
    prompts = [p["prompt_ids"] for p in pairs] * 2
    replies = [p["real_ids"] for p in pairs] + [p["generated_ids"] for p in pairs]
    return prompts, replies


def pair_logps(model, pairs: list[dict], scoring: Scoring):
    """log p(y|x) and log p(y'|x) of a batch of pairs, real and generated in ONE forward."""
    prompts, replies = pair_batch(pairs)
    logps, _ = score(model, prompts, replies, scoring)  # (2B,)
    return logps[: len(pairs)], logps[len(pairs):]  # (B,) real, (B,) generated


@torch.no_grad()
def opponent_logps(model, pairs: list[dict], args) -> None:
    """Store log p_θt(y|x) and log p_θt(y'|x) with every pair: the opponent is frozen for the whole
    iteration, so this one pass replaces the reference model that DPO-style trainers keep. The
    batches are the training batches' layout (pair_batch), per_device_train_batch_size pairs."""
    from tqdm import tqdm

    model.eval()
    scoring, size = Scoring.of_run(args), args.per_device_train_batch_size
    bars = distributed.bars_off(args.quiet)
    for start in tqdm(range(0, len(pairs), size), desc="opponent log-probs", disable=bars):
        batch = pairs[start:start + size]
        opponent_real_logps, opponent_generated_logps = pair_logps(model, batch, scoring)  # (b,)
        for p, real, generated in zip(batch, opponent_real_logps.tolist(),
                                      opponent_generated_logps.tolist()):
            p["opponent_real_logp"], p["opponent_generated_logp"] = real, generated


def disable_dropout(model) -> None:
    """Dropout would make log p_θ ≠ log p_θt at θ = θ_t, so the loss would not start at ℓ(0).
    Both kinds: nn.Dropout modules, and the attention_dropout rate attention layers apply."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def rmsprop(model, learning_rate: float, total_steps: int, warmup_ratio: float):
    """The paper's optimizer (§5.1): RMSProp without weight decay; linear warmup, linear decay."""
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or --use_peft's adapters
    optimizer = torch.optim.RMSprop(trained, lr=learning_rate, weight_decay=0.0)
    warmup_steps = math.ceil(warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # no step runs at lr 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def batches(pairs: list[dict], iteration: int, args):
    """(epoch, the pairs of one optimizer step over all ranks), in the order training sees them: a
    function of (seed, iteration, epoch), so a resumed run sees the same batches. With
    --group_by_length a step's pairs have similar lengths (machinery/batching.py)."""
    from machinery import batching

    size = pairs_per_step(args)
    for epoch in range(args.num_train_epochs):
        seed = data.seed(args.seed, "order", iteration, epoch=epoch)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(pairs), generator=generator).tolist()
        if args.group_by_length:
            lengths = [batching.pair_length(p, args.max_prompt_length, args.max_length)
                       for p in pairs]
            order = batching.grouped_by_length(order, lengths, size, generator)
        for start in range(0, len(order), size):
            yield epoch, [pairs[i] for i in order[start:start + size]]


def train_step(trainer, step_pairs: list[dict], scoring: Scoring, args) -> dict:
    """Forward and backward of this rank's share of one optimizer step's pairs (Eq. 4.7); returns
    the step's sums over all ranks: loss, rewards, reward accuracy, tokens (those the model saw,
    after --max_prompt_length and --max_length cut), pairs."""
    keys = ("loss", "real_reward", "generated_reward", "reward_accuracy", "tokens", "pairs")
    sums = dict.fromkeys(keys, 0.0)
    micro_batches = distributed.micro_batches(step_pairs, args.per_device_train_batch_size)
    for k, (batch, weight) in enumerate(micro_batches):  # weight: its share of the step's mean
        prompts, replies = pair_batch(batch)
        logps, _ = score(trainer.policy, prompts, replies, scoring)  # (2b,)
        policy_real_logps, policy_generated_logps = logps[:len(batch)], logps[len(batch):]  # (b,)
        device = policy_real_logps.device
        opponent_real_logps = torch.tensor([p["opponent_real_logp"] for p in batch])  # (b,)
        opponent_generated_logps = torch.tensor([p["opponent_generated_logp"] for p in batch])
        losses, real_rewards, generated_rewards = spin_loss(  # Eq. 4.7, each (b,)
            policy_real_logps, policy_generated_logps, opponent_real_logps.to(device),
            opponent_generated_logps.to(device), args.beta, args.loss_type)
        trainer.backward(losses.sum() * weight, last=k == len(micro_batches) - 1)
        if weight:
            sums["loss"] += losses.sum().item()
            sums["real_reward"] += real_rewards.sum().item()
            sums["generated_reward"] += generated_rewards.sum().item()
            sums["reward_accuracy"] += (real_rewards > generated_rewards).float().sum().item()
            sums["tokens"] += sum(len(data.build_sequence(x, y, scoring.max_prompt_length,
                                                          scoring.max_length)["input_ids"])
                                  for x, y in zip(prompts, replies))
            sums["pairs"] += len(batch)
    return dict(zip(sums, distributed.all_sum(list(sums.values()))))


def train(model, pairs: list[dict], *, learning_rate: float, iteration: int, args,
          iteration_dir: Path, on_step=None):
    """Algorithm 1, line 5: θ_{t+1} = argmin_θ L_SPIN(θ, θ_t), from θ = θ_t (the opponent's
    weights). Returns (per-step metrics, the trainer: backends.Plain or Zero3). A stopped
    iteration resumes from iteration_dir/checkpoint (machinery/steps.py). on_step(record) sees
    every step's metrics."""
    model.train()
    if args.gradient_checkpointing:  # activations recomputed in backward: less memory, more time
        model.activation_checkpointing_enable()
    disable_dropout(model)
    total_steps = math.ceil(len(pairs) / pairs_per_step(args)) * args.num_train_epochs
    optimizer, scheduler = rmsprop(model, learning_rate, total_steps, args.warmup_ratio)
    trainer = backends.trainer(model, optimizer, args)  # ZeRO-3 partitions model, optimizer state
    steps = Steps(trainer, scheduler, iteration_dir=iteration_dir, iteration=iteration,
                  total=total_steps, args=args, on_step=on_step)
    scoring = Scoring.of_run(args)
    for step, (epoch, step_pairs) in enumerate(batches(pairs, iteration, args)):
        if steps.done(step):
            continue
        started = time.time()
        sums = train_step(trainer, step_pairs, scoring, args)
        lr = scheduler.get_last_lr()[0]
        grad_norm = trainer.step()  # clipped to --max_grad_norm, RMSProp applied
        steps.check(step, sums["loss"] / sums["pairs"], grad_norm)
        scheduler.step()
        means = ("loss", "real_reward", "generated_reward", "reward_accuracy")
        record = {k: sums[k] / sums["pairs"] for k in means}
        record["margin"] = record["real_reward"] - record["generated_reward"]
        record.update(iteration=iteration, step=step, epoch=epoch, learning_rate=lr,
                      grad_norm=grad_norm, tokens_per_s=sums["tokens"] / (time.time() - started))
        steps.log(record)
        steps.save_or_stop(step)
    return steps.close(), trainer


def sample_pairs(model, tokenizer, run_data: data.RunData, t: int, args, run: RunDir) -> list[dict]:
    """Algorithm 1, line 3: one y' ~ p_θt(·|x) per prompt, as rows of (x, y, y'). Rank r samples
    prompts r, r + world, ...; what a stopped run sampled is kept and not sampled again."""
    if (pairs := run.pairs(t)) is not None:
        print0(f"iteration {t}: reusing the generated responses in "
               f"{run.file(t, 'synthetic.jsonl')}")
        return pairs
    shard = distributed.shard(len(run_data.rows))  # this rank's prompts
    # done: what a stopped run sampled; save_batch appends each new batch to this rank's file
    done, save_batch = run.sampled(t, [run_data.rows[i]["id"] for i in shard])
    prompts = [run_data.prompts[i] for i in shard]
    samples = gen.generate(model, tokenizer, prompts, gen.Sampling.of_run(args),
                           seed=data.seed(args.seed, "samples", t, args.rank),
                           progress=not distributed.bars_off(args.quiet), stop=run_data.stop,
                           done=done, on_batch=save_batch, should_stop=preemption.requested)
    preemption.stop_if_requested(f"while sampling iteration {t}'s responses (the sampled are kept)")
    pairs = [data.spin_pair(run_data.rows[i], run_data.prompts[i], run_data.real_ids[i], sample, t)
             for i, sample in zip(shard, samples)]
    return run.save_pairs(t, pairs, [r["id"] for r in run_data.rows])


def opponent_pass(model, train_pairs: list[dict], t: int, args, run: RunDir) -> None:
    """log p_θt(y|x) and log p_θt(y'|x) of every training pair, once per iteration (each rank
    scores its shard), attached to the pairs; a stopped run's saved values are reused."""
    logps = run.opponent_logps(t, train_pairs)
    if logps is None:
        shard = distributed.shard(len(train_pairs))
        mine = [train_pairs[i] for i in shard]
        opponent_logps(model, mine, args)
        scored = {i: (p["opponent_real_logp"], p["opponent_generated_logp"])
                  for i, p in zip(shard, mine)}
        logps = run.save_opponent_logps(t, train_pairs, scored)
    else:
        print0(f"iteration {t}: reusing the opponent log-probs in "
               f"{run.file(t, 'opponent_logps.jsonl')}")
    for p, (real, generated) in zip(train_pairs, logps):
        p["opponent_real_logp"], p["opponent_generated_logp"] = real, generated
    preemption.stop_if_requested(f"after iteration {t}'s opponent log-probs, which are saved")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:  # python spin.py --plot RUN_DIR: redraw and exit
        return redraw(Path(args.plot))
    distributed.start(args, relaunch=argv is None)  # joins the ranks' group under --deepspeed
    config = run_config(args)
    run = RunDir(args, config)  # refuses a foreign directory, another process, other settings
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer, model, run_data, token_rows = prepare(args, run)  # bad input fails here, not later
    run.begin(token_rows)
    completed = run.completed()
    if completed:
        print0(f"resuming {run.path}: iterations 0..{completed - 1} are complete; continuing from "
               f"iter{completed - 1}/model")
        model = load_opponent(run.path / f"iter{completed - 1}" / "model", args)
    model.to(distributed.device(args))
    report = Report(run.path, args, config, tokenizer, run_data)
    report.start(model, completed)
    previous = run.pairs(completed - 1) if completed else []

    for t in range(completed, args.iters):  # Algorithm 1, lines 1 and 6: for t ... end for
        preemption.stop_if_requested(f"before iteration {t}, the iterations before it complete")
        iteration_dir = run.iteration(t)
        report.begin_iteration(t)
        pairs = sample_pairs(model, tokenizer, run_data, t, args, run)  # y' ~ p_θt, frozen opponent
        train_pairs = pairs + (previous if args.mix_previous_iteration else [])  # §5.1: and t−1's
        opponent_pass(model, train_pairs, t, args, run)  # log p_θt of y and y', once
        lr = args.learning_rate[min(t, len(args.learning_rate) - 1)]
        history, trainer = train(model, train_pairs, learning_rate=lr, iteration=t, args=args,
                                 iteration_dir=iteration_dir, on_step=report.log_step)  # θ_{t+1}
        trainer.save_model(tokenizer, iteration_dir / "model", args)
        trainer.release()  # the optimizer state and ZeRO-3's partitions go before θ_{t+1} loads
        del trainer, model  # the next opponent is θ_{t+1} exactly as saved, a whole copy again
        gc.collect()  # ZeRO-3's engine sits in reference cycles: freed now, not at some later pass
        model = load_opponent(iteration_dir / "model", args).to(distributed.device(args))
        run.complete(t, report.end_iteration(t, model, pairs, train_pairs, history, lr))
        previous = pairs
    report.finish()
    if args.use_peft and distributed.writer():  # for deployment: base + adapter as one model
        adapters.merge(run.file(args.iters - 1, "model"), run.path / "merged")
    run.close()
    distributed.teardown()


def load_opponent(path: Path, args):
    """θ_t from its saved directory: a whole inference copy on every rank."""
    dtype, bits = weights_dtype(args), adapters.quantization(args)  # QLoRA: the base in 4 bits
    _, model = load_model(str(path), attn_implementation=args.attn_implementation,
                          trust_remote_code=args.trust_remote_code, dtype=dtype,
                          quantization=bits)
    return model


def cli(argv=None) -> int:
    """main() as a command: bad input is one line on stderr and exit status 2 (machinery/cli.py)."""
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
