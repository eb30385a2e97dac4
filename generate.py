"""Sample the synthetic responses y' ~ p_θt(·|x) from the frozen opponent (Algorithm 1, line 3
of arXiv 2401.01335v3: "Generate y'_i ~ p_θt(·|x_i)").

One response per prompt, from the prompt ids that training will use (data.ChatFormat), so the
prompt/response boundary is identical in both; it stops on the model's own stop ids (stop_ids).
Prompts are batched by length, left-padded (a decoder continues from the right end), and each
batch is seeded, so a run is reproducible. For every prompt we keep the generated token ids
themselves (never re-tokenized), the text, and whether it ended on a stop id or hit the
max_new_tokens limit.

    python generate.py --model runs/toy/iter0/model --data toy --out samples.jsonl
    python generate.py --model alignment-handbook/zephyr-7b-sft-full \\
        --data HuggingFaceH4/ultrachat_200k --split test_sft --max_samples 100 --out samples.jsonl
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
    from machinery import flags, models  # the command line's own entry: flags and model loading

    p = flags.ArgumentParser(description="Sample one response per prompt from a model.")
    p.add_argument("--model", required=True, help="model directory, hub id, or 'toy'")
    p.add_argument("--data", required=True,
                   help="'toy', a local .jsonl/.json/.parquet file, or a hub data set")
    p.add_argument("--split", default="train", help="data set split")
    p.add_argument("--out", required=True, help="output .jsonl, one row per prompt")
    p.add_argument("--max_samples", type=int, default=None, help="use the first N prompts")
    p.add_argument("--max_prompt_length", type=int, default=512,
                   help="prompt tokens kept, from the left")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system_prompt",
                   help="insert a system turn with this text before conversations that have none")
    p.add_argument("--chat_template_kwargs", type=flags.json_object, metavar="JSON",
                   help="chat template keyword arguments, e.g. '{\"enable_thinking\": false}'")
    args = p.parse_args(argv)
    try:
        models.go_offline_if_hub_unreachable(args.model, args.data)
        rows = data.load_rows(args.data, args.split)[: args.max_samples]
        tokenizer, model = models.load_model(args.model)
        chat = data.ChatFormat(tokenizer, args.system_prompt, args.chat_template_kwargs,
                               f"--model {args.model}")
        prompts = [data.cut_prompt(chat.prompt_ids(r["messages"]), args.max_prompt_length)
                   for r in rows]
    except (data.DataError, models.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sampling = Sampling(args.max_new_tokens, not args.greedy, args.temperature, args.top_p,
                        args.batch_size)
    results = generate(model, tokenizer, prompts, sampling, args.seed, progress=True,
                       stop=stop_ids(model, tokenizer, chat.end_of_turn))
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row, result in zip(rows, results):
            f.write(json.dumps({"id": row["id"], "messages": row["messages"],
                                "real": row["response"], "generated": result["text"],
                                "generated_ids": result["generated_ids"],
                                "ended": result["ended"]}) + "\n")
    os.replace(tmp, args.out)  # the file appears whole or not at all
    print(f"wrote {len(results)} responses to {args.out} "
          f"({sum(r['ended'] for r in results)} ended on a stop id, the rest hit --max_new_tokens)")


if __name__ == "__main__":
    main()
