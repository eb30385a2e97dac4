"""generate.py: batched, left-padded sampling gives what one-at-a-time decoding gives."""
import torch

import data
import generate
from conftest import tiny_mistral

PROMPTS = ["1+2", "10+20", "5+55", "99+1", "7+0"]


def test_batched_greedy_equals_one_prompt_at_a_time(tokenizer):
    model = tiny_mistral(tokenizer, seed=3)
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    batched = generate.generate(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, batch_size=3)
    for prompt, result in zip(prompts, batched):
        single = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = single[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert result["generated_ids"] == expected
        assert result["ended"] == (expected[-1] == tokenizer.eos_token_id)
        assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_records_whether_a_response_ended_or_hit_the_limit(small_sft_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_sft_model)
    model = AutoModelForCausalLM.from_pretrained(small_sft_model)
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    full = generate.generate(model, tokenizer, prompts, max_new_tokens=16, do_sample=False)
    assert all(r["ended"] and r["generated_ids"][-1] == tokenizer.eos_token_id for r in full)
    assert all(tokenizer.eos_token_id not in r["generated_ids"][:-1] for r in full)  # nothing after EOS
    # one token fewer than each full answer: every response is cut at the limit and has no EOS
    for prompt, result in zip(prompts, full):
        limit = len(result["generated_ids"]) - 1
        [cut] = generate.generate(model, tokenizer, [prompt], max_new_tokens=limit, do_sample=False)
        assert cut == {"generated_ids": result["generated_ids"][:-1], "text": result["text"], "ended": False}


def test_sampling_is_reproducible_by_seed(small_sft_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_sft_model)
    model = AutoModelForCausalLM.from_pretrained(small_sft_model)
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS * 8]
    a = generate.generate(model, tokenizer, prompts, max_new_tokens=10, seed=1, batch_size=16)
    b = generate.generate(model, tokenizer, prompts, max_new_tokens=10, seed=1, batch_size=16)
    c = generate.generate(model, tokenizer, prompts, max_new_tokens=10, seed=2, batch_size=16)
    assert a == b
    assert a != c


def test_generate_cli_writes_every_prompt_once(small_sft_model, tmp_path):
    import json

    out = tmp_path / "samples.jsonl"
    generate.main(["--model", str(small_sft_model), "--data", "toy", "--max_samples", "20",
                   "--max_new_tokens", "12", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(20))
    assert all(set(r) >= {"generated", "generated_ids", "ended", "real"} for r in rows)
