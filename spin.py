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
    iterations.jsonl            one line per completed iteration: losses, rewards, toy metrics, time
    iter{t}/synthetic.jsonl     iteration t's prompts with real and generated responses and their token ids
    iter{t}/opponent_logps.jsonl   log p_θt of every training pair of iteration t
    iter{t}/metrics.jsonl       one line per optimizer step
    iter{t}/model/              θ_{t+1}: save_pretrained model + tokenizer, the opponent of iteration t+1
    iter{t}/complete.json       written last: iteration t is done
"""
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import data
import distributed
import evaluation
import generate as gen
import plot
import report
from cli import UsageError, go_offline_if_hub_unreachable, parse_args
from models import ModelError, load_model
from logps import batch_logps
from loss import spin_loss


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: shown as one line, exit status 1."""


def pair_logps(model, pairs: list[dict], args) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|x) and log p(y'|x) of a batch of pairs, real and generated in ONE forward pass."""
    device = next(model.parameters()).device
    sequences = [data.build_sequence(p["prompt_ids"], p[key], args.max_prompt_length, args.max_length)
                 for key in ("real_ids", "generated_ids") for p in pairs]
    batch = {k: v.to(device) for k, v in data.collate(sequences, args.pad_token_id).items()}
    logps = batch_logps(model, batch, args.bf16)  # (2B,) logits at response positions only (logps.py)
    return logps[: len(pairs)], logps[len(pairs):]  # (B,) real, (B,) generated


@torch.no_grad()
def opponent_logps(model, pairs: list[dict], args) -> None:
    """Store log p_θt(y|x) and log p_θt(y'|x) with every pair: the opponent is frozen for the whole
    iteration, so this one pass replaces the reference model that DPO-style trainers keep in memory."""
    model.eval()
    size = args.per_device_train_batch_size
    for start in tqdm(range(0, len(pairs), size), desc="opponent log-probs", unit="batch",
                      disable=True if args.quiet else None):
        batch = pairs[start:start + size]
        real, generated = pair_logps(model, batch, args)
        for p, r, g in zip(batch, real.tolist(), generated.tolist()):
            p["opponent_real_logp"], p["opponent_generated_logp"] = r, g


def disable_dropout(model) -> None:
    """Dropout would make log p_θ ≠ log p_θt at θ = θ_t, so the loss would not start at ℓ(0).
    Both kinds: nn.Dropout modules, and the attention_dropout rate attention layers apply themselves."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def train(model, pairs: list[dict], learning_rate: float, iteration: int, args, it: Path, on_step=None):
    """θ_{t+1} = argmin_θ L_SPIN(θ, θ_t), starting from θ = θ_t (the same weights as the opponent).
    Returns (per-step metrics, the DeepSpeed engine or None). Resumes from it/checkpoint when a
    stopped run left one there. on_step(record) sees every step's metrics (TensorBoard)."""
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # recompute activations in backward: less memory, ~30% more time
    disable_dropout(model)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=learning_rate, weight_decay=0.0)  # paper §5.1
    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size  # global
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total_steps = steps_per_epoch * args.num_train_epochs
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # linear warmup, then linear decay; no step runs at lr 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine = distributed.wrap(model, optimizer, args)  # ZeRO-3 partitions model and optimizer state
    policy = engine or model
    state, metrics_path = it / "checkpoint", it / "metrics.jsonl"
    first_step = 0  # nothing saved: the iteration starts from θ_t, the weights the model has now
    if engine is None and (state.exists() or state.with_name("checkpoint.old").exists()):
        first_step = checkpoint.load_training_state(state, model, optimizer, scheduler)
        print(f"iteration {iteration}: resuming training at step {first_step} of {total_steps} from {state}")
    history = [m for m in checkpoint.read_jsonl(metrics_path) if m["step"] < first_step]
    if args.rank == 0:
        checkpoint.write_jsonl(metrics_path, history)  # steps logged after the checkpoint are redone
    bar = tqdm(total=total_steps, initial=first_step, desc=f"train iteration {iteration}", unit="step",
               disable=True if args.quiet else None)
    step, saved_step = 0, first_step
    for epoch in range(args.num_train_epochs):
        # The data order is a function of (seed, iteration, epoch): a resumed run sees the same batches.
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed + 1000 * iteration + epoch))
        for start in range(0, len(pairs), batch_size):
            if step < first_step:
                step += 1
                continue
            started = time.time()
            step_pairs = [pairs[i] for i in order[start:start + batch_size]]
            mine = step_pairs[args.rank::args.world_size]  # this rank's share of the global batch
            # Every rank runs the same number of micro-batches (ZeRO-3 gathers weights in each forward);
            # a rank short of pairs in the last batch runs one with weight 0.
            micro_steps = math.ceil(math.ceil(len(step_pairs) / args.world_size) / args.per_device_train_batch_size)
            micro_batches = [mine[k * args.per_device_train_batch_size:(k + 1) * args.per_device_train_batch_size]
                             for k in range(micro_steps)]
            totals = [0.0] * 6  # loss, real reward, generated reward, reward accuracy, tokens, pairs
            for k, batch in enumerate(micro_batches):
                weight = args.world_size / len(step_pairs) if batch else 0.0  # ranks' mean -> the global mean
                batch = batch or step_pairs[:1]
                if engine:
                    engine.set_gradient_accumulation_boundary(k == micro_steps - 1)
                policy_real_logps, policy_generated_logps = pair_logps(policy, batch, args)  # (b,), (b,)
                losses, real_rewards, generated_rewards = spin_loss(
                    policy_real_logps, policy_generated_logps,
                    torch.tensor([p["opponent_real_logp"] for p in batch], device=policy_real_logps.device),
                    torch.tensor([p["opponent_generated_logp"] for p in batch], device=policy_real_logps.device),
                    args.beta, args.loss_type)
                loss = losses.sum() * weight  # (b,) -> the step's mean loss, this micro-batch's share
                if engine:
                    engine.backward(loss, scale_wrt_gas=False)
                else:
                    loss.backward()
                if weight:
                    totals = [a + b for a, b in zip(totals, [
                        losses.sum().item(), real_rewards.sum().item(), generated_rewards.sum().item(),
                        (real_rewards > generated_rewards).float().sum().item(),
                        sum(len(p["prompt_ids"]) * 2 + len(p["real_ids"]) + len(p["generated_ids"]) for p in batch),
                        len(batch)])]
            totals = distributed.all_sum(args, totals)
            n = totals[5]
            if engine:
                engine.step()  # clips to --max_grad_norm and steps RMSProp on this rank's partition
                grad_norm = float(engine.get_global_grad_norm())
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm).item()
            if not (math.isfinite(totals[0]) and math.isfinite(grad_norm)):
                kept = (f"the training state saved at step {saved_step} is kept in {state} and a re-run resumes from it"
                        if saved_step else "no training state was saved yet: a re-run restarts the iteration")
                raise TrainingDiverged(
                    f"iteration {iteration}, step {step}: non-finite loss {totals[0] / n} or gradient norm "
                    f"{grad_norm}; stopped{'' if engine else ' without applying the step'}; {kept} (or lower "
                    f"--learning_rate and pass --overwrite_output_dir to start over)")
            lr = scheduler.get_last_lr()[0]
            if engine is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            record = dict(loss=totals[0] / n, real_reward=totals[1] / n, generated_reward=totals[2] / n,
                          reward_accuracy=totals[3] / n)
            record["margin"] = record["real_reward"] - record["generated_reward"]
            record.update(iteration=iteration, step=step, epoch=epoch, learning_rate=lr, grad_norm=grad_norm,
                          tokens_per_s=totals[4] / (time.time() - started))
            if args.rank == 0:
                checkpoint.append_jsonl(metrics_path, [record])
                if on_step:
                    on_step(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:.3f}",
                            acc=f"{record['reward_accuracy']:.2f}", lr=f"{lr:.1e}")
            step += 1
            if engine is None and step % args.save_steps == 0 and step < total_steps:
                checkpoint.save_training_state(state, model, optimizer, scheduler, step)
                saved_step = step
    bar.close()
    return history, engine


def sample_pairs(model, tokenizer, rows: list[dict], prompts: list[list[int]], real_ids: list[list[int]], t: int,
                 args, it: Path, stop: list[int]) -> list[dict]:
    """Algorithm 1, line 3: one y' ~ p_θt(·|x) per prompt, as rows of (x, y, y').

    Rank r samples prompts r, r + world, ... and appends each finished batch to
    generated.rank{r}.jsonl, so a stopped run continues where it was; rank 0 then merges the
    shards in prompt order into synthetic.jsonl."""
    final = it / "synthetic.jsonl"
    if final.exists():
        print(f"iteration {t}: reusing the generated responses in {final}")
        return checkpoint.read_jsonl(final)
    shard = list(range(args.rank, len(rows), args.world_size))
    partial = it / f"generated.rank{args.rank}.jsonl"
    found = checkpoint.read_jsonl(partial)
    checkpoint.write_jsonl(partial, found)  # drop a line torn by a kill before appending to the file
    position = {rows[i]["id"]: k for k, i in enumerate(shard)}
    done = {position[d["id"]]: d for d in found}
    if done:
        print(f"iteration {t}: found {len(done)} of {len(shard)} generated responses in {partial}; "
              f"sampling the rest")

    def on_batch(positions, results):
        checkpoint.append_jsonl(partial, [{"id": rows[shard[k]]["id"], **r}
                                          for k, r in zip(positions, results) if k not in done])

    gen.generate(model, tokenizer, [prompts[i] for i in shard], args.max_new_tokens, not args.greedy,
                 args.temperature, args.top_p, args.generation_batch_size,
                 args.seed + 1_000_000 * t + 10_000 * args.rank, progress=not args.quiet, done=done,
                 on_batch=on_batch, stop=stop)
    distributed.barrier(args)
    if args.rank == 0:
        samples = {}
        for path in sorted(it.glob("generated.rank*.jsonl")):
            samples.update({d["id"]: d for d in checkpoint.read_jsonl(path)})
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
        print(f"iteration {t}: reusing the opponent log-probs in {path}")
    else:
        shard = list(range(args.rank, len(train_pairs), args.world_size))
        opponent_logps(model, [train_pairs[i] for i in shard], args)  # once for the iteration
        scored = distributed.all_gather(args, [(i, train_pairs[i]["opponent_real_logp"],
                                                train_pairs[i]["opponent_generated_logp"]) for i in shard])
        by_index = {i: (real, generated) for i, real, generated in scored}
        saved = [{"iteration": p["iteration"], "id": p["id"], "opponent_real_logp": by_index[i][0],
                  "opponent_generated_logp": by_index[i][1]} for i, p in enumerate(train_pairs)]
        if args.rank == 0:
            checkpoint.write_jsonl(path, saved)
        distributed.barrier(args)
    for p, s in zip(train_pairs, saved):
        p["opponent_real_logp"], p["opponent_generated_logp"] = s["opponent_real_logp"], s["opponent_generated_logp"]


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
                    found.append({"split": split, "id": r["id"], "prompt_ids": chat.prompt_ids(r["messages"]),
                                  "real_ids": chat.reply_ids(r["messages"], r["response"])})
                except data.DataError as e:
                    raise data.DataError(f"{flag} {source}, row {r['id']}: {e}") from None
    train, held = [f for f in found if f["split"] == "train"], [f for f in found if f["split"] == "heldout"]
    return {"rows": found, "prompts": [f["prompt_ids"] for f in train], "real_ids": [f["real_ids"] for f in train],
            "heldout_prompts": [f["prompt_ids"] for f in held], "heldout_real_ids": [f["real_ids"] for f in held]}


def describe(tokenizer, ids: list[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in ids)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:  # python spin.py --plot RUN_DIR
        if not (Path(args.plot) / "config.json").exists():
            raise UsageError(f"--plot {args.plot}: not a SPIN run directory (no config.json)")
        print(f"wrote {plot.draw(Path(args.plot))}")
        return
    if args.deepspeed and argv is None:
        distributed.exit_if_relaunched(sys.argv)  # plain `python spin.py` on a multi-GPU machine
    distributed.setup(args)
    if args.world_size > 1 and not args.deepspeed:
        raise UsageError(f"{args.world_size} processes were launched without --deepspeed; pass "
                         f"--deepspeed configs/ds_zero3.json")
    run = Path(args.output_dir)
    config = {k: v for k, v in vars(args).items() if k not in ("rank", "local_rank", "plot")}
    found = {p.name for p in run.iterdir()} if run.is_dir() else set()
    if found and "config.json" not in found and found - checkpoint.STARTUP_LEFTOVERS:
        raise UsageError(f"--output_dir {run} is a non-empty directory that is not a SPIN run; choose another")
    if found and args.rank == 0:
        checkpoint.lock(run)  # one run per directory, before reading its state (checkpoint.lock)
    resuming = "config.json" in found and not args.overwrite_output_dir
    if resuming:
        try:
            checkpoint.check_config(run, config)
        except checkpoint.ConfigMismatch as e:
            raise UsageError(str(e)) from None
    elif found and "config.json" not in found and args.rank == 0:
        print(f"note: --output_dir {run} holds only what a start stopped before writing config.json left "
              f"({', '.join(sorted(found))}); starting the run there")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 and args.deepspeed else torch.float32  # DeepSpeed keeps fp32 masters
    # Model and data first: bad input fails before anything is written to the run directory.
    go_offline_if_hub_unreachable(args.model, args.dataset, *([args.eval_dataset] if args.eval_dataset else []))
    tokenizer, model = load_model(args.model, args.attn_implementation, args.trust_remote_code, dtype)
    args.pad_token_id = tokenizer.pad_token_id
    rows = data.load_rows(args.dataset, args.dataset_split, args.turn)
    rows, heldout_rows = evaluation.heldout_rows(rows, args)  # prompts that training never sees
    if args.max_samples and args.max_samples < len(rows):
        rows = [rows[i] for i in sorted(random.Random(args.seed).sample(range(len(rows)), args.max_samples))]
    if args.eval_tasks:
        evaluation.check_tasks(args)
    chat = data.ChatFormat(tokenizer, args.system_prompt, args.chat_template_kwargs, f"--model {args.model}")
    stop = gen.stop_ids(model, tokenizer, chat.end_of_turn)  # every id that ends a reply
    tokens = tokenize(chat, rows, heldout_rows, run / "tokens.jsonl" if resuming else None, args)
    prompts = [p[-args.max_prompt_length:] for p in tokens["prompts"]]  # from the left, as in training
    real_ids = tokens["real_ids"]
    cut = sum(len(p) > args.max_prompt_length for p in tokens["prompts"])
    long = sum(len(p) + len(y) > args.max_length for p, y in zip(prompts, real_ids))
    print(f"data: {len(rows)} prompts from {args.dataset}; {cut} prompts longer than --max_prompt_length "
          f"{args.max_prompt_length} were cut from the left; {long} human responses will be cut to fit "
          f"--max_length {args.max_length} (trained without their end-of-turn)")
    print(f"replies end with {describe(tokenizer, [chat.end_of_turn]) if chat.end_of_turn is not None else 'EOS'} "
          f"(the chat template's end-of-turn); generation stops on {describe(tokenizer, stop)}")
    if chat.end_of_turn is None:
        print(f"note: the chat template of {args.model} writes no special token after a reply; human replies "
              f"end with the tokenizer's EOS instead (docs/differences.md)")
    if chat.not_prefix_stable:
        print(f"note: the chat template of {args.model} is not prefix-stable on {chat.not_prefix_stable} "
              f"conversations (the rendered conversation does not start with the rendered prompt's ids); their "
              f"human replies are the text after the prompt, tokenized on its own (docs/differences.md)")
    ignored = gen.ignored_generation_settings(model)
    if ignored:
        print(f"note: sampling follows --temperature/--top_p/--max_new_tokens{'/--greedy' if args.greedy else ''} "
              f"only; the model's generation_config also sets {json.dumps(ignored)}, not used")
    heldout = {"rows": heldout_rows, "prompts": [p[-args.max_prompt_length:] for p in tokens["heldout_prompts"]],
               "real_ids": tokens["heldout_real_ids"]}
    print(f"held-out evaluation: {len(heldout_rows)} prompts that training never sees"
          + (f"; lm-eval tasks {','.join(args.eval_tasks)}" if args.eval_tasks else ""))

    if not resuming and args.rank == 0:
        if not found:  # a new directory: locked as soon as it exists; a second process started with us stops here
            run.mkdir(parents=True, exist_ok=True)
            checkpoint.lock(run)
            if (run / "config.json").exists():
                raise checkpoint.RunInUse(f"--output_dir {run} was started by another process meanwhile; "
                                          f"run the same command again to resume it")
        checkpoint.empty(run)  # --overwrite_output_dir, or what an interrupted start left
        checkpoint.write_atomic(run / "config.json", json.dumps(config, indent=1))
    if args.rank == 0 and not (run / "tokens.jsonl").exists():
        checkpoint.write_jsonl(run / "tokens.jsonl", tokens["rows"])
    distributed.barrier(args)
    print("SPIN configuration:", json.dumps(config))
    completed = 0
    while (run / f"iter{completed}" / "complete.json").exists():
        if args.rank == 0:
            checkpoint.clean(run / f"iter{completed}")
        completed += 1
    if completed:
        print(f"resuming {run}: iterations 0..{completed - 1} are complete; continuing from iter{completed - 1}/model")
        _, model = load_model(str(run / f"iter{completed - 1}" / "model"), args.attn_implementation, args.trust_remote_code, dtype)
    model.to(distributed.device(args))
    tracker = report.Tracker(run, args) if args.rank == 0 else None

    # Evaluation runs on rank 0 alone (a whole copy of the model on every rank); the others wait.
    measure_start = args.rank == 0 and not (run / "start.json").exists()
    if measure_start:
        start = {"iteration": "start", **evaluation.evaluate(model, tokenizer, 0, heldout, args, run, stop)}
        checkpoint.write_atomic(run / "start.json", json.dumps(start))
    distributed.barrier(args)
    summary = [json.loads((run / "start.json").read_text())] + \
        [json.loads((run / f"iter{t}" / "complete.json").read_text()) for t in range(completed)]
    cols = report.columns(summary[0])
    report.print_header(cols)
    for row in summary:
        report.print_row(row, cols)
    if tracker and measure_start:  # logged once: a resumed run's first new event is a redone step
        tracker.log_eval(summary[0], 0)
    previous = checkpoint.read_jsonl(run / f"iter{completed - 1}" / "synthetic.jsonl") if completed else []
    for t in range(completed, args.iters):
        it = run / f"iter{t}"
        if args.rank == 0:
            it.mkdir(exist_ok=True)
        distributed.barrier(args)
        started = time.time()
        pairs = sample_pairs(model, tokenizer, rows, prompts, real_ids, t, args, it, stop)  # y' ~ p_θt, the frozen opponent
        # The paper (§5.1): iteration t ≥ 1 trains on the synthetic data of iterations t−1 and t.
        train_pairs = pairs + (previous if args.mix_previous_iteration else [])
        attach_opponent_logps(model, train_pairs, t, args, it)
        if args.rank == 0:  # what a stopped run measured of θ_{t+1} is stale: training runs again below
            for stale in (run / "eval" / f"model{t + 1}.jsonl", run / "eval" / f"lm_eval_model{t + 1}.json"):
                stale.unlink(missing_ok=True)
        lr = args.learning_rate[min(t, len(args.learning_rate) - 1)]
        history, engine = train(model, train_pairs, lr, t, args, it, on_step=tracker.log_step if tracker else None)
        distributed.save_model(engine, model, tokenizer, it / "model", args)  # θ_{t+1}
        # The next opponent is θ_{t+1} exactly as saved: a whole copy again, also after ZeRO-3 partitioned it.
        del engine, model
        _, model = load_model(str(it / "model"), args.attn_implementation, args.trust_remote_code, dtype)
        model.to(distributed.device(args))
        if args.rank == 0:
            tail = history[-10:]  # the last 10 steps: one batch alone is noisy
            [after] = gen.generate(model, tokenizer, prompts[:1], args.max_new_tokens, not args.greedy,
                                   args.temperature, args.top_p, 1, args.seed + 1_000_000 * (t + 1), stop=stop)
            row = {"iteration": t, "pairs": len(train_pairs), "learning_rate": lr, "first_loss": history[0]["loss"],
                   **{k: sum(h[k] for h in tail) / len(tail) for k in ("loss", "margin", "reward_accuracy")},
                   "ended": sum(p["ended"] for p in pairs) / len(pairs),
                   **evaluation.evaluate(model, tokenizer, t + 1, heldout, args, run, stop),
                   "seconds": round(time.time() - started, 1),
                   "sample": pairs[0]["generated"][-1]["content"], "sample_after": after["text"]}
            checkpoint.write_atomic(it / "model" / "README.md", report.model_card(config, row, summary[0]))
            checkpoint.write_atomic(it / "complete.json", json.dumps(row))  # the marker: written last
            checkpoint.clean(it)
            report.print_row(row, cols)
            summary.append(row)
            tracker.log_eval(row, t + 1)
            report.write_evaluation(run, summary)
            plot.draw(run)
        distributed.barrier(args)
        previous = pairs
    if args.rank == 0:
        summary = summary[:args.iters + 1]  # a run directory may hold more iterations than --iters asks for
        checkpoint.write_jsonl(run / "iterations.jsonl", summary[1:])
        report.write_evaluation(run, summary)
        plot.draw(run)
        tracker.close()
        showcase = {"prompt": rows[0]["messages"][-1]["content"], "human": rows[0]["response"],
                    "model": [s["sample"] for s in summary[1:]] + [summary[-1]["sample_after"]]}
        report.print_summary(summary, showcase, run)
    checkpoint.unlock()


def cli(argv=None) -> int:
    """main() with bad input turned into one line on stderr and an exit status: 2 for bad input."""
    try:
        main(argv)
    except (UsageError, ModelError, data.DataError, checkpoint.RunInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        checkpoint.unlock()  # for callers in the same process (tests); a process's exit releases it anyway
    return 0


if __name__ == "__main__":
    sys.exit(cli())
