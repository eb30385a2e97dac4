"""SPIN, Algorithm 1 of arXiv 2401.01335v3 (Self-Play Fine-Tuning), as one visible loop.

    for t in 0 .. iters-1:
        y'  ~ p_θt(·|x) for every prompt x of the SFT data     (generate.py: the frozen opponent)
        log p_θt(y|x), log p_θt(y'|x), once for the iteration   (opponent_logps: no second model)
        θ_{t+1} = argmin_θ L_SPIN(θ, θ_t)  on (x, y, y')         (train: loss.py, Eq. 4.7)
        θ_{t+1} is the next opponent

    python spin.py                                          # the embedded toy, offline, ~2 min on 2 CPU cores
    python spin.py --model zephyr-7b-sft-full --iters 4     # the paper's recipe (GPUs)
    python spin.py --model PATH_OR_HUB_ID --dataset data.jsonl --output_dir runs/mine

Run directory (--output_dir); re-running the same command resumes it (see checkpoint.py):
    config.json                 the resolved configuration
    tokens.jsonl                every prompt's and human reply's ids, rendered once by the chat template
    iterations.jsonl            one line per completed iteration: losses, rewards, toy metrics, time
    iter{t}/synthetic.jsonl     iteration t's prompts with real and generated responses and their token ids
    iter{t}/opponent_logps.jsonl   log p_θt of every training pair of iteration t
    iter{t}/metrics.jsonl       one line per optimizer step
    iter{t}/model/              θ_{t+1}: save_pretrained model + tokenizer, the opponent of iteration t+1
    iter{t}/complete.json       written last: iteration t is done
"""
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import backends
import batching
import checkpoint
import data
import distributed
import evaluation
import generate as gen
import hub
import plot
import preemption
import toy
from cli import UsageError, parse_args
from distributed import print0
from logps import score, score_all
from loss import spin_loss
from models import ModelError, go_offline_if_hub_unreachable, load_model
from report import Report


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: shown as one line, exit status 1."""


def pair_logps(model, pairs: list[dict], max_prompt_length: int, max_length: int, bf16: bool = False,
               padding_free: bool = False):
    """log p(y|x) and log p(y'|x) of a batch of pairs, real and generated in ONE forward pass."""
    logps, _ = score(model, [p["prompt_ids"] for p in pairs] * 2,
                     [p["real_ids"] for p in pairs] + [p["generated_ids"] for p in pairs],
                     max_prompt_length, max_length, bf16, padding_free)  # (2B,) logps.py
    return logps[: len(pairs)], logps[len(pairs):]  # (B,) real, (B,) generated


def opponent_logps(model, pairs: list[dict], args) -> None:
    """Store log p_θt(y|x) and log p_θt(y'|x) with every pair: the opponent is frozen for the whole
    iteration, so this one pass replaces the reference model that DPO-style trainers keep in memory."""
    scored = score_all(model, [p["prompt_ids"] for p in pairs for _ in (0, 1)],  # y and y' of a pair in one batch
                       [y for p in pairs for y in (p["real_ids"], p["generated_ids"])],
                       2 * args.per_device_train_batch_size, args.max_prompt_length, args.max_length, args.bf16,
                       "opponent log-probs", progress=not distributed.bars_off(args), padding_free=args.padding_free)
    for p, (real, _), (generated, _) in zip(pairs, scored[0::2], scored[1::2]):
        p["opponent_real_logp"], p["opponent_generated_logp"] = real, generated


def disable_dropout(model) -> None:
    """Dropout would make log p_θ ≠ log p_θt at θ = θ_t, so the loss would not start at ℓ(0).
    Both kinds: nn.Dropout modules, and the attention_dropout rate attention layers apply themselves."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def rmsprop(model, learning_rate: float, total_steps: int, warmup_ratio: float):
    """The paper's optimizer (§5.1): RMSProp without weight decay; linear warmup, then linear decay."""
    optimizer = torch.optim.RMSprop(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup_steps = math.ceil(warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # no step runs at lr 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def global_batch(args) -> int:
    """Pairs per optimizer step, over all ranks."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def batches(pairs: list[dict], iteration: int, args):
    """(epoch, the pairs of one optimizer step over all ranks), in the order training sees them. The
    order is a function of (seed, iteration, epoch): a resumed run sees the same batches. With
    --group_by_length a step's pairs have similar lengths (batching.grouped_by_length)."""
    size = global_batch(args)
    for epoch in range(args.num_train_epochs):
        generator = torch.Generator().manual_seed(data.seed(args.seed, "order", iteration, epoch=epoch))
        order = torch.randperm(len(pairs), generator=generator).tolist()
        if args.group_by_length:
            order = batching.grouped_by_length(order, [batching.pair_length(p, args.max_prompt_length, args.max_length) for p in pairs],
                                           size, generator)
        for start in range(0, len(order), size):
            yield epoch, [pairs[i] for i in order[start:start + size]]


def train_step(trainer, step_pairs: list[dict], args) -> dict:
    """Forward and backward of this rank's share of one optimizer step's pairs (Eq. 4.7); returns the
    step's sums over all ranks: loss, rewards, reward accuracy, tokens, pairs."""
    mine = step_pairs[args.rank::args.world_size]
    size = args.per_device_train_batch_size
    # Every rank runs the same number of micro-batches (ZeRO-3 gathers weights in each forward);
    # a rank short of pairs in the last batch runs one with weight 0.
    micro_steps = math.ceil(math.ceil(len(step_pairs) / args.world_size) / size)
    sums = dict.fromkeys(("loss", "real_reward", "generated_reward", "reward_accuracy", "tokens", "pairs"), 0.0)
    for k in range(micro_steps):
        batch = mine[k * size:(k + 1) * size]
        weight = args.world_size / len(step_pairs) if batch else 0.0  # ranks' mean -> the global mean
        batch = batch or step_pairs[:1]
        policy_real_logps, policy_generated_logps = pair_logps(trainer.policy, batch, args.max_prompt_length, args.max_length,
                                                                args.bf16, args.padding_free)  # (b,), (b,)
        losses, real_rewards, generated_rewards = spin_loss(
            policy_real_logps, policy_generated_logps,
            torch.tensor([p["opponent_real_logp"] for p in batch], device=policy_real_logps.device),
            torch.tensor([p["opponent_generated_logp"] for p in batch], device=policy_real_logps.device),
            args.beta, args.loss_type)
        trainer.backward(losses.sum() * weight, last=k == micro_steps - 1)  # (b,) -> this micro-batch's share
        if weight:
            sums["loss"] += losses.sum().item()
            sums["real_reward"] += real_rewards.sum().item()
            sums["generated_reward"] += generated_rewards.sum().item()
            sums["reward_accuracy"] += (real_rewards > generated_rewards).float().sum().item()
            sums["tokens"] += sum(len(p["prompt_ids"]) * 2 + len(p["real_ids"]) + len(p["generated_ids"]) for p in batch)
            sums["pairs"] += len(batch)
    return dict(zip(sums, distributed.all_sum(args, list(sums.values()))))


def train(model, pairs: list[dict], learning_rate: float, iteration: int, args, it: Path, on_step=None):
    """θ_{t+1} = argmin_θ L_SPIN(θ, θ_t), starting from θ = θ_t (the same weights as the opponent).
    Returns (per-step metrics, the trainer: backends.Plain or Zero3). Resumes from it/checkpoint
    when a stopped run left one there. on_step(record) sees every step's metrics (TensorBoard)."""
    model.train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # recompute activations in backward: less memory, ~30% more time
    disable_dropout(model)
    total_steps = math.ceil(len(pairs) / global_batch(args)) * args.num_train_epochs
    optimizer, scheduler = rmsprop(model, learning_rate, total_steps, args.warmup_ratio)
    trainer = backends.trainer(model, optimizer, args)  # ZeRO-3 partitions model and optimizer state
    state, metrics_path = it / "checkpoint", it / "metrics.jsonl"
    first_step = saved_step = trainer.load_state(state, scheduler)  # 0: the iteration starts from θ_t
    if first_step:
        print0(f"iteration {iteration}: resuming training at step {first_step} of {total_steps} from {state}")
    history = [m for m in checkpoint.read_jsonl(metrics_path) if m["step"] < first_step]
    if args.rank == 0:
        checkpoint.write_jsonl(metrics_path, history)  # steps logged after the checkpoint are redone
    bar = tqdm(total=total_steps, initial=first_step, desc=f"train iteration {iteration}", unit="step",
               disable=distributed.bars_off(args))
    for step, (epoch, step_pairs) in enumerate(batches(pairs, iteration, args)):
        if step < first_step:
            continue
        started = time.time()
        sums = train_step(trainer, step_pairs, args)
        grad_norm = trainer.clip()
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            raise diverged(iteration, step, sums["loss"] / sums["pairs"], grad_norm, saved_step, state, trainer)
        lr = scheduler.get_last_lr()[0]
        trainer.update()
        scheduler.step()
        record = {k: sums[k] / sums["pairs"] for k in ("loss", "real_reward", "generated_reward", "reward_accuracy")}
        record["margin"] = record["real_reward"] - record["generated_reward"]
        record.update(iteration=iteration, step=step, epoch=epoch, learning_rate=lr, grad_norm=grad_norm,
                      tokens_per_s=sums["tokens"] / (time.time() - started))
        if args.rank == 0:
            checkpoint.append_jsonl(metrics_path, [record])
            if on_step:
                on_step(record)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:.3f}",
                        acc=f"{record['reward_accuracy']:.2f}", lr=f"{lr:.1e}")
        if (step + 1) % args.save_steps == 0 and step + 1 < total_steps:
            trainer.save_state(state, scheduler, step + 1)
            saved_step = step + 1
        signal_name = preemption.agreed(args)  # every rank stops after the same step
        if signal_name:
            if saved_step != step + 1:  # not saved a moment ago by --save_steps
                trainer.save_state(state, scheduler, step + 1)
            raise preemption.Stopped(f"stopped by {signal_name} in iteration {iteration} after step {step + 1} of "
                                     f"{total_steps}; the training state is saved in {state}; run the same "
                                     f"command to resume")
    bar.close()
    return history, trainer


def diverged(iteration: int, step: int, loss: float, grad_norm: float, saved_step: int, state: Path, trainer):
    kept = (f"the training state saved at step {saved_step} is kept in {state} and a re-run resumes from it"
            if saved_step else "no training state was saved yet: a re-run restarts the iteration")
    return TrainingDiverged(
        f"iteration {iteration}, step {step}: non-finite loss {loss} or gradient norm {grad_norm}; "
        f"stopped{'' if trainer.applies_before_check else ' without applying the step'}; {kept} (or lower "
        f"--learning_rate and pass --overwrite_output_dir to start over)")


def sample_pairs(model, tokenizer, run_data: data.RunData, t: int, args, it: Path) -> list[dict]:
    """Algorithm 1, line 3: one y' ~ p_θt(·|x) per prompt, as rows of (x, y, y').

    Rank r samples prompts r, r + world, ... and appends each finished batch to
    generated.rank{r}.jsonl, so a stopped run continues where it was; the shards then meet through
    the process group and are written in prompt order into synthetic.jsonl."""
    final = it / "synthetic.jsonl"
    if final.exists():
        print0(f"iteration {t}: reusing the generated responses in {final}")
        return checkpoint.read_jsonl(final)
    rows, prompts, real_ids = run_data.rows, run_data.prompts, run_data.real_ids
    shard = list(range(args.rank, len(rows), args.world_size))
    partial = it / f"generated.rank{args.rank}.jsonl"
    found = checkpoint.read_jsonl(partial)
    checkpoint.write_jsonl(partial, found)  # drop a line torn by a kill before appending to the file
    position = {rows[i]["id"]: k for k, i in enumerate(shard)}
    done = {position[d["id"]]: d for d in found}
    if done:
        print0(f"iteration {t}: found {len(done)} of {len(shard)} generated responses in {partial}; "
              f"sampling the rest")

    def on_batch(positions, results):
        checkpoint.append_jsonl(partial, [{"id": rows[shard[k]]["id"], **r}
                                          for k, r in zip(positions, results) if k not in done])

    results = gen.generate(model, tokenizer, [prompts[i] for i in shard], args.max_new_tokens, not args.greedy,
                           args.temperature, args.top_p, args.generation_batch_size,
                           data.seed(args.seed, "samples", t, args.rank), progress=not distributed.bars_off(args),
                           done=done, on_batch=on_batch, stop=run_data.stop, should_stop=preemption.requested,
                           bf16=args.bf16)
    preemption.stop_if_requested(args, f"while sampling iteration {t}'s responses (those sampled are kept in {it})")
    # The shards meet through the process group, not the disk: nodes need not share one.
    samples = {d["id"]: d for d in distributed.all_gather(args, [{"id": rows[i]["id"], **r} for i, r in zip(shard, results)])}
    if distributed.writer(args):  # rank 0; or, when each node keeps its own run directory, each node's first rank
        # Rows in the official SPIN schema (real/generated conversations) plus the exact token ids.
        pairs = [{"id": r["id"], "iteration": t,
                  "real": r["messages"] + [{"role": "assistant", "content": r["response"]}],
                  "generated": r["messages"] + [{"role": "assistant", "content": samples[r["id"]]["text"]}],
                  "ended": samples[r["id"]]["ended"], "prompt_ids": p,
                  "real_ids": y, "generated_ids": samples[r["id"]]["generated_ids"]}
                 for r, p, y in zip(rows, prompts, real_ids)]
        checkpoint.write_jsonl(final, pairs)
        for path in it.glob("generated.rank*.jsonl"):
            path.unlink()
    distributed.barrier(args)
    return checkpoint.read_jsonl(final)


def attach_opponent_logps(model, train_pairs: list[dict], t: int, args, it: Path) -> None:
    """log p_θt of every training pair, from the file of a stopped run, or computed now (each rank
    scores its shard) and saved."""
    path = it / "opponent_logps.jsonl"
    keys = [(p["iteration"], p["id"]) for p in train_pairs]
    saved = checkpoint.read_jsonl(path)
    if [(s["iteration"], s["id"]) for s in saved] == keys:
        print0(f"iteration {t}: reusing the opponent log-probs in {path}")
    else:
        shard = list(range(args.rank, len(train_pairs), args.world_size))
        opponent_logps(model, [train_pairs[i] for i in shard], args)  # once for the iteration
        scored = distributed.all_gather(args, [(i, train_pairs[i]["opponent_real_logp"],
                                                train_pairs[i]["opponent_generated_logp"]) for i in shard])
        by_index = {i: (real, generated) for i, real, generated in scored}
        saved = [{"iteration": p["iteration"], "id": p["id"], "opponent_real_logp": by_index[i][0],
                  "opponent_generated_logp": by_index[i][1]} for i, p in enumerate(train_pairs)]
        if distributed.writer(args):
            checkpoint.write_jsonl(path, saved)
        distributed.barrier(args)
    for p, s in zip(train_pairs, saved):
        p["opponent_real_logp"], p["opponent_generated_logp"] = s["opponent_real_logp"], s["opponent_generated_logp"]
    preemption.stop_if_requested(args, f"after iteration {t}'s opponent log-probs, saved in {path}")


def tokenize(chat: data.ChatFormat, rows: list[dict], heldout_rows: list[dict], saved: Path | None, args) -> dict:
    """The prompt ids and human reply ids of every training and held-out row, rendered once per run
    and kept in <run>/tokens.jsonl: a resumed run reads them back, so a template that prints today's
    date (Llama-3.2's) or a changed tokenizer file cannot change the pairs halfway through a run."""
    keys = [("train", r["id"]) for r in rows] + [("heldout", r["id"]) for r in heldout_rows]
    found = checkpoint.read_jsonl(saved) if saved else []
    if [(f["split"], f["id"]) for f in found] != keys:
        found = []
        for split, source, flag, part in (("train", args.dataset, "--dataset", rows),
                                          ("heldout", args.eval_dataset or args.dataset, "--eval_dataset" if args.eval_dataset else "--dataset", heldout_rows)):
            for r in part:
                try:
                    prompt_ids, real_ids = chat.pair(r["messages"], r["response"])
                    found.append({"split": split, "id": r["id"], "prompt_ids": prompt_ids, "real_ids": real_ids})
                except data.DataError as e:
                    raise data.DataError(f"{flag} {source}, row {r['id']}: {e}") from None
    train, held = [f for f in found if f["split"] == "train"], [f for f in found if f["split"] == "heldout"]
    return {"rows": found, "prompts": [f["prompt_ids"] for f in train], "real_ids": [f["real_ids"] for f in train],
            "heldout_prompts": [f["prompt_ids"] for f in held], "heldout_real_ids": [f["real_ids"] for f in held]}


def describe(tokenizer, ids: list[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in ids)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:  # python spin.py --plot RUN_DIR: redraw and exit
        return redraw(Path(args.plot))
    if args.deepspeed and argv is None:
        distributed.exit_if_relaunched(sys.argv)  # plain `python spin.py` on a multi-GPU machine
    distributed.setup(args)
    if args.world_size > 1 and not args.deepspeed:
        raise UsageError(f"{args.world_size} processes were launched without --deepspeed; pass "
                         f"--deepspeed configs/ds_zero3.json")
    config = {k: v for k, v in vars(args).items() if k not in ("rank", "local_rank", "plot", "config")}
    run = checkpoint.RunDir(args, config)  # refuses a foreign directory, another process, other settings
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer, model, spin_data, token_rows = prepare(args, run)  # bad input fails here, before any write
    run.begin(token_rows)
    print0("SPIN configuration:", json.dumps(config))
    completed = run.completed()
    if completed:
        print0(f"resuming {run.path}: iterations 0..{completed - 1} are complete; continuing from "
              f"iter{completed - 1}/model")
        model = opponent(run.path / f"iter{completed - 1}" / "model", args)
    model.to(distributed.device(args))
    report = Report(run.path, args, config, tokenizer, spin_data)
    report.start(model, completed)
    previous = checkpoint.read_jsonl(run.path / f"iter{completed - 1}" / "synthetic.jsonl") if completed else []

    for t in range(completed, args.iters):  # Algorithm 1
        preemption.stop_if_requested(args, f"before iteration {t}, with the iterations before it complete")
        it = run.iteration(t)
        report.begin_iteration(t)
        pairs = sample_pairs(model, tokenizer, spin_data, t, args, it)  # y' ~ p_θt, the frozen opponent
        train_pairs = pairs + (previous if args.mix_previous_iteration else [])  # §5.1: also t−1's pairs
        attach_opponent_logps(model, train_pairs, t, args, it)  # log p_θt of y and y', once
        lr = args.learning_rate[min(t, len(args.learning_rate) - 1)]
        history, trainer = train(model, train_pairs, lr, t, args, it, on_step=report.log_step)  # θ_{t+1}
        trainer.save_model(tokenizer, it / "model", args)
        trainer.release()  # the optimizer state and ZeRO-3's partitions go before θ_{t+1} loads
        del trainer, model  # the next opponent is θ_{t+1} exactly as saved, a whole copy again
        gc.collect()  # ZeRO-3's engine sits in reference cycles: free them now, not at the next automatic pass
        model = opponent(it / "model", args).to(distributed.device(args))
        report.end_iteration(t, model, pairs, train_pairs, history, lr)
        previous = pairs
    report.finish()
    checkpoint.unlock()
    distributed.teardown()


def opponent(path: Path, args):
    """θ_t from its saved directory: a whole inference copy on every rank."""
    return load_model(str(path), args.attn_implementation, args.trust_remote_code, weights_dtype(args))[1]


def weights_dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 and args.deepspeed else torch.float32  # DeepSpeed keeps fp32 masters


def redraw(run: Path) -> None:
    if not (run / "config.json").exists():
        raise UsageError(f"--plot {run}: not a SPIN run directory (no config.json)")
    print(f"wrote {plot.draw(run)}")


def prepare(args, run: checkpoint.RunDir):
    """The model, the data and their tokens, all checked before anything is written. Returns
    (tokenizer, model, data.RunData, the rows of tokens.jsonl)."""
    go_offline_if_hub_unreachable(args.model, args.dataset, *([args.eval_dataset] if args.eval_dataset else []))
    if args.push_to_hub:  # one rank asks the Hub; every rank stops on its answer
        refused = None
        if args.rank == 0:
            try:
                hub.check(args)
            except UsageError as e:
                refused = str(e)
        if refused := distributed.broadcast(args, refused):
            raise UsageError(refused)
    tokenizer, model = load_model(args.model, args.attn_implementation, args.trust_remote_code, weights_dtype(args),
                                  args.model_revision, args.gguf_file)
    rows = toy.load_rows(args.dataset, args.dataset_split, args.turn, "--dataset", args.dataset_revision,
                         args.dataset_config)  # "toy" is resolved here, once
    rows, heldout_rows = evaluation.heldout_rows(rows, args)  # prompts that training never sees
    if args.max_samples and args.max_samples < len(rows):
        rows = [rows[i] for i in sorted(random.Random(args.seed).sample(range(len(rows)), args.max_samples))]
    if args.eval_tasks:
        evaluation.check_tasks(args)
    chat = data.ChatFormat(tokenizer, args.system_prompt, args.chat_template_kwargs, f"--model {args.model}")
    stop = gen.stop_ids(model, tokenizer, chat.end_of_turn)  # every id that ends a reply
    tokens = tokenize(chat, rows, heldout_rows, run.saved_tokens(), args)
    prompts = [p[-args.max_prompt_length:] for p in tokens["prompts"]]  # from the left, as in training
    heldout = {"rows": heldout_rows, "prompts": [p[-args.max_prompt_length:] for p in tokens["heldout_prompts"]],
               "real_ids": tokens["heldout_real_ids"]}
    spin_data = data.RunData(rows, prompts, tokens["real_ids"], heldout, stop)
    describe_data(args, tokenizer, model, chat, tokens["prompts"], spin_data)
    return tokenizer, model, spin_data, tokens["rows"]


def describe_data(args, tokenizer, model, chat: data.ChatFormat, uncut: list[list[int]], d: data.RunData) -> None:
    """What the log says about the data before the run starts: cuts, end-of-turn, stop ids, notes."""
    cut = sum(len(p) > args.max_prompt_length for p in uncut)
    long = sum(len(p) + len(y) > args.max_length for p, y in zip(d.prompts, d.real_ids))
    print0(f"data: {len(d.rows)} prompts from {args.dataset}; {cut} prompts longer than --max_prompt_length "
          f"{args.max_prompt_length} were cut from the left; {long} human responses will be cut to fit "
          f"--max_length {args.max_length} (trained without their end-of-turn)")
    print0(f"replies end with {describe(tokenizer, [chat.end_of_turn]) if chat.end_of_turn is not None else 'EOS'} "
          f"(the chat template's end-of-turn); generation stops on {describe(tokenizer, d.stop)}")
    if chat.end_of_turn is None:
        print0(f"note: the chat template of {args.model} writes no special token after a reply; human replies "
              f"end with the tokenizer's EOS instead (docs/differences.md)")
    if chat.not_prefix_stable:
        print0(f"note: the chat template of {args.model} is not prefix-stable on {chat.not_prefix_stable} "
              f"conversations (the rendered conversation does not start with the rendered prompt's ids); their "
              f"human replies are the text after the prompt, tokenized on its own (docs/differences.md)")
    ignored = gen.ignored_generation_settings(model)
    if ignored:
        print0(f"note: sampling follows --temperature/--top_p/--max_new_tokens{'/--greedy' if args.greedy else ''} "
              f"only; the model's generation_config also sets {json.dumps(ignored)}, not used")
    print0(f"held-out evaluation: {len(d.heldout['rows'])} prompts that training never sees"
          + (f"; lm-eval tasks {','.join(args.eval_tasks)}" if args.eval_tasks else ""))


def cli(argv=None) -> int:
    """main() with bad input turned into one line on stderr and an exit status: 2 for bad input,
    preemption.EXIT_RESUMABLE (75) for a run stopped by a signal with its state saved."""
    preemption.install()
    try:
        main(argv)
    except (UsageError, ModelError, data.DataError, checkpoint.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except preemption.Stopped as e:
        if distributed.world()[0] == 0:  # every rank stops; one says so
            print(e, file=sys.stderr)
        return preemption.EXIT_RESUMABLE
    finally:
        checkpoint.unlock()  # for callers in the same process (tests); a process's exit releases it anyway
        preemption.reset()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
