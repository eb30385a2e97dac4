"""generate.py: batched, left-padded sampling gives what one-at-a-time decoding gives."""
import torch

import data
import generate
from conftest import read_jsonl, tiny_mistral

PROMPTS = ["1+2", "10+20", "5+55", "99+1", "7+0"]


def test_batched_greedy_equals_one_prompt_at_a_time(tokenizer):
    model = tiny_mistral(tokenizer, seed=3)
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    batched = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=6, do_sample=False, batch_size=3))
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
    full = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=16, do_sample=False))
    assert all(r["ended"] and r["generated_ids"][-1] == tokenizer.eos_token_id for r in full)
    assert all(tokenizer.eos_token_id not in r["generated_ids"][:-1] for r in full)  # nothing after EOS
    # one token fewer than each full answer: every response is cut at the limit and has no EOS
    for prompt, result in zip(prompts, full):
        limit = len(result["generated_ids"]) - 1
        [cut] = generate.generate(model, tokenizer, [prompt], generate.Sampling(max_new_tokens=limit, do_sample=False))
        assert cut == {"generated_ids": result["generated_ids"][:-1], "text": result["text"], "ended": False}


def test_sampling_is_reproducible_by_seed(small_sft_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_sft_model)
    model = AutoModelForCausalLM.from_pretrained(small_sft_model)
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS * 8]
    a = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=10, batch_size=16), seed=1)
    b = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=10, batch_size=16), seed=1)
    c = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=10, batch_size=16), seed=2)
    assert a == b
    assert a != c


def test_generate_cli_writes_every_prompt_once(small_sft_model, tmp_path):

    out = tmp_path / "samples.jsonl"
    generate.main(["--model", str(small_sft_model), "--data", "toy", "--max_samples", "20",
                   "--max_new_tokens", "12", "--out", str(out)])
    rows = read_jsonl(out)
    # --max_samples 20: drawn with --seed (42), in the data's order, as spin.py draws them
    assert [r["id"] for r in rows] == [r["id"] for r in data.subsample(data.load_rows("toy"), 20, 42)]
    assert all(set(r) >= {"generated", "generated_ids", "ended", "real"} for r in rows)


def test_a_generation_config_with_two_stop_ids_stops_on_either(tokenizer):
    model = tiny_mistral(tokenizer, seed=5)
    seven = tokenizer.convert_tokens_to_ids("7")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, seven]  # like Llama-3-Instruct's list
    stop = generate.stop_ids(model, tokenizer)
    assert stop == sorted([tokenizer.eos_token_id, seven])
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS * 16]
    results = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=40, batch_size=80), seed=0)
    for r in results:
        stops = [k for k, token in enumerate(r["generated_ids"]) if token in stop]
        assert stops == ([len(r["generated_ids"]) - 1] if r["ended"] else [])  # exactly one, at the end
        assert r["ended"] or len(r["generated_ids"]) == 40
    endings = [r["generated_ids"][-1] for r in results if r["ended"]]
    assert endings.count(seven) >= 5 and endings.count(tokenizer.eos_token_id) >= 5  # both stop ids stopped replies


def test_the_models_own_sampling_settings_do_not_apply(tokenizer):
    """Qwen2.5 ships repetition_penalty 1.05 and top_k 20 in its generation_config: y' would not be
    p_θt at the flags' temperature. Here: a strong penalty and top_k=1 (which would make sampling greedy)."""
    model = tiny_mistral(tokenizer, seed=3)
    model.generation_config.repetition_penalty, model.generation_config.top_k = 5.0, 1
    assert generate.ignored_generation_settings(model) == {"top_k": 1, "repetition_penalty": 5.0}
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy = generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=12, do_sample=False))
    for prompt, result in zip(prompts, greedy):  # argmax of the model's own logits, one token at a time
        ids = list(prompt)
        for _ in range(12):
            with torch.no_grad():
                ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
            if ids[-1] == tokenizer.eos_token_id:
                break
        assert result["generated_ids"] == ids[len(prompt):]
    penalized = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompts[0]):].tolist()
    assert penalized[: len(greedy[0]["generated_ids"])] != greedy[0]["generated_ids"]  # the penalty would matter
    sampled = generate.generate(model, tokenizer, prompts * 4, generate.Sampling(max_new_tokens=12), seed=0)
    assert [s["generated_ids"] for s in sampled[:5]] != [g["generated_ids"] for g in greedy]  # top_k=1 is off
    assert model.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_generate_cli_takes_spin_names_and_its_old_names_alike(small_sft_model, tmp_path):
    """--dataset/--dataset_split/--generation_batch_size (spin.py's names) and --data/--split/
    --batch_size (generate.py's earlier ones) are the same flags; --max_samples draws its prompts
    with --seed, as spin.py does."""
    common = ["--model", str(small_sft_model), "--max_samples", "12", "--seed", "3",
              "--max_new_tokens", "8"]
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    generate.main([*common, "--dataset", "toy", "--dataset_split", "train",
                   "--generation_batch_size", "5", "--out", str(new)])
    generate.main([*common, "--data", "toy", "--split", "train", "--batch_size", "5",
                   "--out", str(old)])
    assert read_jsonl(new) == read_jsonl(old)
    drawn = data.subsample(data.load_rows("toy", "train"), 12, 3)
    assert [r["id"] for r in read_jsonl(new)] == [r["id"] for r in drawn]


def test_generate_resolves_a_recipe_as_spin_does():
    """--model RECIPE: the recipe's model (at its revision) and its sampling settings; the toy's
    model is "toy", which models.load_model builds (toy.sft_model_path)."""
    from machinery import cli, flags

    def resolved(*argv):
        return cli.resolve(flags.generate_parser(), [*argv, "--out", "s.jsonl"], launcher=False,
                           derive=cli.attention_fallback)[0]

    toy = resolved("--model", "toy", "--dataset", "toy")
    assert (toy.model, toy.recipe, toy.dataset, toy.max_new_tokens, toy.generation_batch_size,
            toy.max_prompt_length, toy.seed) == ("toy", "toy", "toy", 16, 500, 32, 42)
    zephyr = resolved("--model", "zephyr-7b-sft-full", "--batch_size", "8")
    assert (zephyr.model, zephyr.model_revision, zephyr.bf16, zephyr.generation_batch_size) == \
        ("alignment-handbook/zephyr-7b-sft-full", "ac6e600eefcce74f5e8bae1035d4f66019e93190",
         True, 8)
    assert zephyr.attn_implementation == "sdpa"  # the recipe's flash_attention_2 needs a GPU


def test_generate_cli_samples_under_bf16_as_spin_does(small_sft_model, tmp_path):
    """--bf16 reaches sampling (generate.Sampling.of_run, as spin.py builds it), on the device
    spin.py uses (machinery/distributed.device: the GPU when there is one; this machine: CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bf16.jsonl"
    generate.main(["--model", str(small_sft_model), "--dataset", "toy", "--max_samples", "40",
                   "--max_new_tokens", "12", "--greedy", "--bf16", "--out", str(out)])
    tokenizer = AutoTokenizer.from_pretrained(small_sft_model)
    model = AutoModelForCausalLM.from_pretrained(small_sft_model)
    rows = data.subsample(data.load_rows("toy", "train"), 40, 42)
    prompts = [data.ChatFormat(tokenizer).prompt_ids(r["messages"]) for r in rows]
    sampled = {bf16: [r["generated_ids"] for r in generate.generate(
        model, tokenizer, prompts, generate.Sampling(max_new_tokens=12, do_sample=False,
                                                     bf16=bf16), seed=42)]
        for bf16 in (True, False)}
    assert [r["generated_ids"] for r in read_jsonl(out)] == sampled[True]
    assert sampled[True] != sampled[False]  # bf16 autocast changes some argmax: the flag mattered
