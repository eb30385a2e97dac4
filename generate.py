"""Sample the synthetic responses y' ~ p_θt(·|x) from the frozen opponent (Algorithm 1, line 3
of arXiv 2401.01335v3: "Generate y'_i ~ p_θt(·|x_i)").

One response per prompt, from the prompt ids that training will use (data.ChatFormat), so the
prompt/response boundary is identical in both; it stops on the model's own stop ids (stop_ids).
Prompts are batched by length, left-padded (a decoder continues from the right end), and each
batch is seeded, so a run is reproducible. For every prompt we keep the generated token ids
themselves (never re-tokenized), the text, and whether it ended on a stop id or hit the
max_new_tokens limit.

The command takes spin.py's flags, defaults and recipes for the model, the data and sampling
(machinery/flags.py; --data, --split and --batch_size, its earlier names, still work):

    python generate.py --model toy --dataset toy --out samples.jsonl   # the toy recipe's model
    python generate.py --model runs/toy/iter0/model --dataset toy --out samples.jsonl
    # the recipe's model at its revision, its sampling settings, bf16 on the GPU if there is one
    python generate.py --model zephyr-7b-sft-full --dataset_split test_sft --max_samples 100 \\
        --out samples.jsonl
"""
import json
import os
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data


def stop_ids(model, tokenizer, end_of_turn: int | None = None) -> list[int]:
    """Every id that ends a reply: the model's generation_config eos_token_id (one id or a list:
    Llama-3-Instruct stops on <|eot_id|> and <|end_of_text|>, Gemma on <end_of_turn>), the
    tokenizer's EOS, and the end-of-turn token the chat template writes (data.ChatFormat)."""
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return sorted({i for i in [*ids, tokenizer.eos_token_id, end_of_turn] if i is not None})


SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p",
            "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "encoder_repetition_penalty",
            "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
            "sequence_bias", "min_length", "min_new_tokens", "max_length", "max_new_tokens",
            "num_beams", "penalty_alpha", "guidance_scale", "renormalize_logits",
            "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
            "stop_strings")


def ignored_generation_settings(model) -> dict:
    """What the model's generation_config.json sets that would change how y' is sampled (Qwen2.5:
    repetition_penalty 1.05, top_k 20, temperature 0.7, ...): none of it applies, the flags do."""
    own = model.generation_config.to_dict()
    return {k: own[k] for k in SAMPLING if own.get(k) is not None}


@dataclass(frozen=True)
class Sampling:
    """How y' is drawn from p_θt: a run's --max_new_tokens, --greedy (do_sample=False),
    --temperature, --top_p, --generation_batch_size and --bf16 (Sampling.of_run)."""
    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    bf16: bool = False  # under bf16 autocast, as training computes (FlashAttention-2 has no fp32)

    @classmethod
    def of_run(cls, args) -> "Sampling":
        """How every part of a run samples: the training pairs, held-out, the report's showcase."""
        return cls(args.max_new_tokens, not args.greedy, args.temperature, args.top_p,
                   args.generation_batch_size, bool(args.bf16))


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], sampling: Sampling = Sampling(),
             seed: int = 0, progress: bool = False, done: dict[int, dict] | None = None,
             on_batch=None, stop: list[int] | None = None, should_stop=None) -> list[dict]:
    """Returns, in the order of `prompts`, {"generated_ids", "text", "ended"} for each prompt.

    stop: the ids that end a reply (default: stop_ids(model, tokenizer)). A reply that ends keeps
    exactly one of them, as its last id, and has ended=True; the others hit max_new_tokens.
    done: results already on disk by prompt index, from a run that was stopped; a batch whose
    prompts are all done is skipped, any other batch is sampled again with its own seed, which
    gives the same tokens. on_batch(indices, results) is called after each sampled batch.
    should_stop(): checked before each batch; when true, the prompts not sampled yet get {}.
    """
    from transformers import GenerationConfig

    done = done or {}
    model.eval()
    stop = set(stop or stop_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # top_k=0: transformers' own default (50) would cut the distribution. Every other field that
    # shapes sampling is neutral because the model's generation_config is set aside (sample_batch).
    how = sampling
    drawn = dict(temperature=how.temperature, top_p=how.top_p, top_k=0) if how.do_sample else {}
    config = GenerationConfig(max_new_tokens=how.max_new_tokens, do_sample=how.do_sample,
                              eos_token_id=sorted(stop), pad_token_id=pad, **drawn)
    # Prompts of similar length share a batch: less padding. The order is restored at the end.
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    results: list[dict] = [{}] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt",
               disable=None if progress else True)  # None: off when stderr is not a terminal
    for number, start in enumerate(range(0, len(order), how.batch_size)):
        batch = order[start:start + how.batch_size]
        if should_stop and should_stop():
            break
        if all(i in done for i in batch):  # sampled before a stop: kept
            fresh = [done[i] for i in batch]
        else:
            torch.manual_seed(data.seed(seed, "batch", 0, batch=number))  # a rerun repeats a batch
            replies = sample_batch(model, [prompts[i] for i in batch], config, how.bf16)
            fresh = [ended_reply(new, stop, tokenizer) for new in replies]
            if on_batch:
                on_batch(batch, fresh)
        for i, result in zip(batch, fresh):
            results[i] = result
        bar.update(len(batch))
        bar.set_postfix(ended=f"{sum(results[i]['ended'] for i in batch) / len(batch):.0%}")
    bar.close()
    return results


def ended_reply(new: list[int], stop: set[int], tokenizer) -> dict:
    """A sampled reply through its first stop id (padding follows it), its text, and whether it
    ended on a stop id (else it hit max_new_tokens)."""
    end = next((k for k, token in enumerate(new) if token in stop), None)
    new = new[: end + 1] if end is not None else new
    return {"generated_ids": new, "text": tokenizer.decode(new, skip_special_tokens=True),
            "ended": end is not None}


def sample_batch(model, prompts: list[list[int]], config, bf16: bool) -> list[list[int]]:
    """One batch of prompts, left-padded (a decoder continues from the right end), through
    model.generate with `config` alone; returns each prompt's new ids, padding included."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    # (B, T) left-padded
    input_ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    # generate() fills every field left unset from model.generation_config (a repetition penalty,
    # top_k, ...): with a blank one in its place, y' ~ p_θt exactly as the flags say.
    own, model.generation_config = model.generation_config, GenerationConfig()
    # Under bf16, hidden states in bf16 from the embedding on, as bf16 weights (ZeRO-3's opponent)
    # make them. With float32 weights under autocast they stay float32, and so do RoPE's cos and
    # sin (transformers computes them in the hidden states' dtype): q and k came out float32, the
    # KV cache held float32 keys beside bf16 values (1.5× its memory), cast at every decode step.
    cast = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, out: out.to(torch.bfloat16)) if bf16 else None
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model.generate(input_ids=input_ids.to(device),
                                    attention_mask=attention_mask.to(device),
                                    generation_config=config)  # (B, T + new)
    finally:
        model.generation_config = own
        if cast:
            cast.remove()
    return output[:, width:].tolist()  # one copy to the host per batch


def main(argv=None) -> None:
    """`python generate.py --model M --dataset D --out FILE`: y' for every prompt, into FILE. The
    flags, their defaults and the recipes are spin.py's (machinery/flags.py, generate_parser)."""
    from machinery import cli, distributed, flags, models

    try:
        args, _ = cli.resolve(flags.generate_parser(), argv, launcher=False,
                              derive=cli.attention_fallback)  # as spin.py resolves its flags
        cli.check_generation(args)
        models.go_offline_if_hub_unreachable(args.model, args.dataset)
        rows = data.load_rows(args.dataset, args.dataset_split, args.turn, "--dataset",
                              args.dataset_revision, args.dataset_config)
        if args.max_samples:  # drawn with --seed, as spin.py draws them
            rows = data.subsample(rows, args.max_samples, args.seed)
        tokenizer, model = models.load_model(args.model, args.attn_implementation,
                                             args.trust_remote_code, revision=args.model_revision,
                                             gguf_file=args.gguf_file)
        chat = data.ChatFormat(tokenizer, args.system_prompt, args.chat_template_kwargs,
                               f"--model {args.model}")
    except (cli.UsageError, data.DataError, models.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    prompts = [data.cut_prompt(chat.prompt_ids(r["messages"]), args.max_prompt_length)
               for r in rows]
    args.deepspeed = None  # one process: distributed.device takes the GPU when there is one
    model.to(distributed.device(args))
    results = generate(model, tokenizer, prompts, Sampling.of_run(args), seed=args.seed,
                       progress=True, stop=stop_ids(model, tokenizer, chat.end_of_turn))
    write_samples(args.out, rows, results)
    print(f"wrote {len(results)} responses to {args.out}, sampled on {model.device} "
          f"({sum(r['ended'] for r in results)} ended on a stop id, the rest hit "
          f"--max_new_tokens)")


def write_samples(path: str, rows: list[dict], results: list[dict]) -> None:
    """One JSON line per prompt: its id and conversation, the real y, the generated y' (text and
    ids) and whether y' ended on a stop id. The file appears whole or not at all."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row, result in zip(rows, results):
            f.write(json.dumps({"id": row["id"], "messages": row["messages"],
                                "real": row["response"], "generated": result["text"],
                                "generated_ids": result["generated_ids"],
                                "ended": result["ended"]}) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
