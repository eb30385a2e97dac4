"""Generated tokens per second of generate.generate against the official script's way: the prompts
in data-set order, a fixed batch size, model.generate on each batch. The same model, prompts,
batch size and max_new_tokens; greedy decoding, so both produce the same tokens (checked).

generate.generate sorts prompts by length, so each batch pads to a similar length: less padding
in the prefill and in every decoding step's attention. Both stop a batch once every row has
ended (model.generate does that by itself).

    python -m benchmarks.generation          # 128 prompts of 16-512 tokens, batch 16, 32 new tokens
    python -m benchmarks.generation --quick    # tiny sizes: what CI runs
"""
import argparse
import random
import statistics
import sys
import time


import torch

import generate
import toy

FULL = dict(hidden=256, layers=4, vocab=32000, prompts=128, lengths=(16, 512), batch=16, new=32)
QUICK = dict(hidden=32, layers=2, vocab=1000, prompts=12, lengths=(2, 40), batch=4, new=4)


def model_and_prompts(sizes: dict, seed: int = 0):
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    tokenizer = toy.build_tokenizer()
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
        intermediate_size=2 * sizes["hidden"],
        num_hidden_layers=sizes["layers"], num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=1024, sliding_window=None, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    model.generation_config = GenerationConfig()
    rng = random.Random(seed)
    prompts = [[rng.randrange(7, tokenizer.vocab_size)
                for _ in range(rng.randint(*sizes["lengths"]))]
               for _ in range(sizes["prompts"])]
    return tokenizer, model, prompts


@torch.no_grad()
def data_set_order(model, tokenizer, prompts, new_tokens, batch_size) -> list[list[int]]:
    """The baseline: consecutive batches in the given order, left-padded, model.generate."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        # (B, T)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
        # (B, T)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                   generation_config=config)
        out += [row[width:].tolist() for row in generated]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    tokenizer, model, prompts = model_and_prompts(sizes)
    runs = {"data-set order": [], "generate.py": []}
    outputs = {}
    for _ in range(1 if args.quick else args.repeats):
        for name in runs:  # interleaved
            started = time.perf_counter()
            if name == "generate.py":
                greedy = generate.Sampling(sizes["new"], do_sample=False, batch_size=sizes["batch"])
                result = [r["generated_ids"]
                          for r in generate.generate(model, tokenizer, prompts, greedy)]
            else:
                result = data_set_order(model, tokenizer, prompts, sizes["new"], sizes["batch"])
            runs[name].append(time.perf_counter() - started)
            outputs[name] = [r[: r.index(tokenizer.eos_token_id) + 1]
                             if tokenizer.eos_token_id in r else
                             [t for t in r if t != tokenizer.pad_token_id] for r in result]
    same = outputs["generate.py"] == outputs["data-set order"]
    tokens = sum(map(len, outputs["generate.py"]))
    lengths = sorted(map(len, prompts))
    print(f"{len(prompts)} prompts of {lengths[0]}-{lengths[-1]} tokens (median "
          f"{lengths[len(lengths) // 2]}), batch {sizes['batch']}, {sizes['new']} new tokens, "
          f"greedy; Mistral hidden {sizes['hidden']}, {sizes['layers']} layers, vocabulary "
          f"{sizes['vocab']}; CPU, medians of {len(runs['generate.py'])} run(s)")
    print(f"same tokens from both: {'yes' if same else 'NO'}")
    print("| generation | seconds | generated tokens/s | ratio |")
    print("|---|---|---|---|")
    base = statistics.median(runs["data-set order"])
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.2f} | {tokens / median:.1f} | {base / median:.2f}x |")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
