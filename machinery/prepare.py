"""Everything a run checks and renders before it writes anything: the model, the data, their tokens,
and what the log says about them. Bad input fails here, as one line naming the flag or row.

    tokenizer, model, run_data, token_rows = prepare(args, run)    # spin.main, before run.begin
"""
import json
from pathlib import Path

import data
import generate as gen
from machinery import adapters, checkpoint, distributed, evaluation, hub, logps, plot
from machinery.cli import UsageError
from machinery.distributed import print0
from machinery.models import go_offline_if_hub_unreachable, load_model


def weights_dtype(args):
    """The dtype the model is loaded in: bf16 under --deepspeed --bf16 (DeepSpeed keeps float32
    masters itself); float32 otherwise, with bf16 autocast where --bf16 asks for it."""
    import torch

    return torch.bfloat16 if args.bf16 and args.deepspeed else torch.float32


def prepare(args, run):
    """The model, the data and their tokens, all checked before anything is written. Returns
    (tokenizer, model, data.RunData, the rows of tokens.jsonl)."""
    go_offline_if_hub_unreachable(args.model, args.dataset,
                                  *([args.eval_dataset] if args.eval_dataset else []))
    if args.push_to_hub:  # one rank asks the Hub; every rank stops on its answer
        refused = None
        if args.rank == 0:
            try:
                hub.check(args)
            except UsageError as e:
                refused = str(e)
        if refused := distributed.broadcast(refused):
            raise UsageError(refused)
    tokenizer, model = load_model(args.model, attn_implementation=args.attn_implementation,
                                  trust_remote_code=args.trust_remote_code,
                                  dtype=weights_dtype(args), revision=args.model_revision,
                                  gguf_file=args.gguf_file,
                                  quantization=adapters.quantization(args))
    # θ_0 = the base, with adapters at zero
    if args.use_peft and not adapters.is_adapter(args.model):
        model = adapters.wrap(model, args)
    rows = data.load_rows(args.dataset, args.dataset_split, args.turn, "--dataset",
                          args.dataset_revision, args.dataset_config)
    rows, heldout_rows = evaluation.heldout_rows(rows, args)  # prompts that training never sees
    if args.max_samples:
        rows = data.subsample(rows, args.max_samples, args.seed)
    if args.eval_tasks:
        evaluation.check_tasks(args)
    chat = data.ChatFormat(tokenizer, args.system_prompt, args.chat_template_kwargs,
                           f"--model {args.model}")
    stop = gen.stop_ids(model, tokenizer, chat.end_of_turn)  # every id that ends a reply
    tokens = tokenize(chat, rows, heldout_rows, run.saved_tokens(), args)
    prompts = [data.cut_prompt(p, args.max_prompt_length) for p in tokens["prompts"]]
    heldout = {"rows": heldout_rows,
               "prompts": [data.cut_prompt(p, args.max_prompt_length)
                           for p in tokens["heldout_prompts"]],
               "real_ids": tokens["heldout_real_ids"]}
    spin_data = data.RunData(rows, prompts, tokens["real_ids"], heldout, stop)
    describe_data(args, tokenizer, model, chat, tokens["prompts"], spin_data)
    return tokenizer, model, spin_data, tokens["rows"]


def describe_data(args, tokenizer, model, chat: data.ChatFormat, uncut: list[list[int]],
                  d: data.RunData) -> None:
    """What the log says about the data before the run starts: cuts, end-of-turn, stop ids,
    notes."""
    cut = sum(len(p) > args.max_prompt_length for p in uncut)
    long = sum(len(p) + len(y) > args.max_length for p, y in zip(d.prompts, d.real_ids))
    print0(f"data: {len(d.rows)} prompts from {args.dataset}; {cut} prompts longer than "
           f"--max_prompt_length {args.max_prompt_length} were cut from the left; {long} human "
           f"responses will be cut to fit --max_length {args.max_length} (trained without their "
           f"end-of-turn)")
    print0(f"replies end with "
           f"{describe(tokenizer, [chat.end_of_turn]) if chat.end_of_turn is not None else 'EOS'} "
           f"(the chat template's end-of-turn); generation stops on {describe(tokenizer, d.stop)}")
    if chat.end_of_turn is None:
        print0(f"note: the chat template of {args.model} writes no special token after a reply; "
               f"human replies end with the tokenizer's EOS instead (docs/differences.md)")
    if chat.not_prefix_stable:
        print0(f"note: the chat template of {args.model} is not prefix-stable on "
               f"{chat.not_prefix_stable} conversations (the rendered conversation does not start "
               f"with the rendered prompt's ids); their human replies are the text after the "
               f"prompt, tokenized on its own (docs/differences.md)")
    ignored = gen.ignored_generation_settings(model)
    if ignored:
        print0(f"note: sampling follows "
               f"--temperature/--top_p/--max_new_tokens{'/--greedy' if args.greedy else ''} only; "
               f"the model's generation_config also sets {json.dumps(ignored)}, not used")
    if args.fast_logps:
        print0("log p(y|x): the fast path (machinery/logps.py: the head on response positions only"
               + (", fused with the log-softmax" if logps.fused_head(model) else "")
               + (", packed rows" if args.padding_free and logps.packs(model) else ", padded rows")
               + "); --no-fast_logps runs loss.sequence_logps on the logits")
    else:
        print0("log p(y|x): loss.sequence_logps on the model's logits of padded rows, the textbook "
               "path (--no-fast_logps)")
    print0(f"held-out evaluation: {len(d.heldout['rows'])} prompts that training never sees"
          + (f"; lm-eval tasks {','.join(args.eval_tasks)}" if args.eval_tasks else ""))


def tokenize(chat: data.ChatFormat, rows: list[dict], heldout_rows: list[dict], saved: Path | None,
             args) -> dict:
    """The prompt ids and human reply ids of every training and held-out row, rendered once per run
    and kept in <run>/tokens.jsonl: a resumed run reads them back, so a template that prints today's
    date (Llama-3.2's) or a changed tokenizer file cannot change the pairs halfway through a run."""
    keys = [("train", r["id"]) for r in rows] + [("heldout", r["id"]) for r in heldout_rows]
    found = checkpoint.read_jsonl(saved) if saved else []
    if [(f["split"], f["id"]) for f in found] != keys:
        found = []
        for split, source, flag, part in (("train", args.dataset, "--dataset", rows),
                                          ("heldout", args.eval_dataset or args.dataset,
                                           "--eval_dataset" if args.eval_dataset else "--dataset",
                                           heldout_rows)):
            for r in part:
                try:
                    prompt_ids, real_ids = chat.pair(r["messages"], r["response"])
                    found.append({"split": split, "id": r["id"], "prompt_ids": prompt_ids,
                                  "real_ids": real_ids})
                except data.DataError as e:
                    raise data.DataError(f"{flag} {source}, row {r['id']}: {e}") from None
    train = [f for f in found if f["split"] == "train"]
    held = [f for f in found if f["split"] == "heldout"]
    return {"rows": found, "prompts": [f["prompt_ids"] for f in train],
            "real_ids": [f["real_ids"] for f in train],
            "heldout_prompts": [f["prompt_ids"] for f in held],
            "heldout_real_ids": [f["real_ids"] for f in held]}


def describe(tokenizer, ids: list[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)} ({i})" for i in ids)


def redraw(run: Path) -> None:
    if not (run / "config.json").exists():
        raise UsageError(f"--plot {run}: not a SPIN run directory (no config.json)")
    print(f"wrote {plot.draw(run)}")
