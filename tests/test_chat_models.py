"""Real chat models: the pairs are the tokens the chat template writes, generation stops where the model stops.

Real tokenizers (llama.cpp's vocab files), real chat templates (TRL's, zephyr's), real human
conversations (chitchat-dataset) and a real chat model (SmolLM2-135M-Instruct), all from packages
(tests/real_parts.py). Tiny random models carry the real tokenizers through `spin.py`.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from machinery import batching
import data
from machinery import logps
from machinery import models
import spin
from machinery import prepare
from conftest import read_jsonl, toy_run
from real_parts import TRL_TEMPLATES, ZEPHYR, chitchat_rows, smollm2_gguf, vocab_tokenizer

# real tokenizers and the packaged real model (tests/real_parts.py), spin.py end to end
pytestmark = pytest.mark.slow

FAMILIES = {  # name: tokenizer, template, EOS to set, generation_config eos ids, flags, the end-of-turn token
    # the recipe's own family: Mistral's SentencePiece vocabulary with zephyr's template and its empty system turn
    "zephyr (Mistral SentencePiece)": ("llama-spm", ZEPHYR, None, [2], ["--system_prompt", ""], "</s>"),
    # Llama-3-Instruct as first released: EOS <|end_of_text|>, generation_config stops on 128001 alone
    "llama3, first-release EOS": ("llama-bpe", "llama3", None, [128001], [], "<|eot_id|>"),
    "llama3 (EOS <|eot_id|>)": ("llama-bpe", "llama3", "<|eot_id|>", [128001, 128008, 128009], [], "<|eot_id|>"),
    "qwen2.5 (ChatML)": ("qwen2", "qwen2_5", "<|im_end|>", [151645, 151643], [], "<|im_end|>"),
    "phi3": ("phi-3", "phi3", None, [32000, 32001, 32007], [], "<|end|>"),
    "qwen3, no thinking": ("qwen2", "qwen3", "<|im_end|>", [151645, 151643],
                           ["--chat_template_kwargs", '{"enable_thinking": false}'], "<|im_end|>"),
}
OLD_WAY_WRONG = ["zephyr (Mistral SentencePiece)", "llama3, first-release EOS", "phi3"]  # the measurements
FLAGS = ["--iters", "1", "--max_new_tokens", "4", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
         "--learning_rate", "1e-4", "--max_length", "256", "--max_prompt_length", "192", "--eval_samples", "0",
         "--generation_batch_size", "4", "--quiet"]


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a safetensors directory (models.from_gguf, cached by the file's hash)."""
    return models.from_gguf(smollm2_gguf())


@pytest.fixture(scope="session")
def conversations(tmp_path_factory):
    path = tmp_path_factory.mktemp("chitchat") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chitchat_rows(4)))
    return path


def tiny_model_with(tokenizer, eos_ids, path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_ids
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def template_ids(tokenizer, messages, reply, end_of_turn, **kwargs):
    """What the chat template writes, computed here without data.ChatFormat: the prompt's ids, and
    the ids after them in the whole conversation, through the last end-of-turn token."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs))
    full = ids(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False,
                                             **kwargs))
    assert full[: len(prompt)] == prompt  # all of these templates are prefix-stable
    after = full[len(prompt):]
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    return prompt, after[: len(after) - after[::-1].index(eot)], after


@pytest.mark.parametrize("family", FAMILIES)
def test_spin_trains_on_the_tokens_the_chat_template_writes(family, conversations, tmp_path, capsys):
    vocab, template, eos, eos_ids, flags, end_of_turn = FAMILIES[family]
    tokenizer = vocab_tokenizer(vocab)
    tokenizer.chat_template = template if "{" in template else (TRL_TEMPLATES / f"{template}.jinja").read_text()
    if eos:
        tokenizer.eos_token = eos
    model_dir = tiny_model_with(tokenizer, eos_ids, tmp_path / "model")
    run = tmp_path / "run"
    spin.main(["--model", str(model_dir), "--dataset", str(conversations), "--output_dir", str(run), *FLAGS, *flags])
    out = capsys.readouterr().out
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert f"replies end with {end_of_turn} ({eot})" in out
    kwargs = json.loads(flags[1]) if flags and flags[0] == "--chat_template_kwargs" else {}
    system = [{"role": "system", "content": ""}] if "--system_prompt" in flags else []
    stop = {tokenizer.eos_token_id, eot, *(eos_ids or [])}
    assert f"generation stops on {prepare.describe(tokenizer, sorted(stop))}" in out
    pairs = read_jsonl(run / "iter0" / "synthetic.jsonl")
    assert len(pairs) == 4
    for pair in pairs:
        messages, reply = system + pair["real"][:-1], pair["real"][-1]["content"]
        prompt, reply_ids, written = template_ids(tokenizer, messages, reply, end_of_turn, **kwargs)
        assert pair["prompt_ids"] == prompt
        assert pair["real_ids"] == reply_ids and pair["real_ids"][-1] == eot
        assert written[: len(reply_ids)] == reply_ids  # only what follows the end-of-turn was dropped
        if family in OLD_WAY_WRONG:  # what this project trained before: the reply tokenized alone, then EOS
            assert pair["real_ids"] != tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ended_on = [i for i, token in enumerate(pair["generated_ids"]) if token in stop]
        assert ended_on == ([len(pair["generated_ids"]) - 1] if pair["ended"] else [])  # one stop id, the last
    first = read_jsonl(run / "iter0" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the real ids are the ones the opponent scored
    assert read_jsonl(run / "tokens.jsonl")[0]["prompt_ids"] == pairs[0]["prompt_ids"]


@pytest.fixture(scope="module")
def smollm2_run(real_evidence_fast):
    """SPIN on a real chat model (SmolLM2-135M-Instruct from the packaged GGUF, after a short SFT on
    chitchat's human replies) and real human conversations: the SPIN run of real_evidence.py --fast,
    2 iterations on 4 prompts, 4 held-out prompts from chitchat's test split."""
    return real_evidence_fast / "seed0-spin"


def test_a_real_chat_model_starts_every_iteration_at_log2(smollm2_run):
    for t in range(2):
        first = read_jsonl(smollm2_run / f"iter{t}" / "metrics.jsonl")[0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["margin"] == pytest.approx(0.0, abs=1e-4)


def test_a_real_chat_models_replies_end_on_its_end_of_turn_token(smollm2_run, smollm2):
    from transformers import AutoTokenizer

    im_end = 2  # SmolLM2's <|im_end|>: its EOS and the end-of-turn token of its ChatML template
    pairs = read_jsonl(smollm2_run / "iter0" / "synthetic.jsonl") + read_jsonl(smollm2_run / "iter1" / "synthetic.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)  # the real model's own tokenizer and template
    for p in pairs:
        prompt, reply_ids, _ = template_ids(tokenizer, p["real"][:-1], p["real"][-1]["content"], "<|im_end|>")
        assert p["prompt_ids"] == prompt and p["real_ids"] == reply_ids
    assert all(p["real_ids"][-1] == im_end and im_end not in p["real_ids"][:-1] for p in pairs)
    # Whether any of these few samples (a 4-bit 135M model at temperature 1) ends is chance; each one that
    # ends, ends on <|im_end|>, and the others stop at the limit. A reply that surely ends: greedy, below.
    assert all(p["generated_ids"][-1] == im_end for p in pairs if p["ended"])
    assert all(im_end not in p["generated_ids"][:-1] for p in pairs)
    tokenizer, model = models.load_model(str(smollm2))
    prompt = data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    [answer] = spin.gen.generate(model, tokenizer, [prompt], spin.gen.Sampling(max_new_tokens=24, do_sample=False))
    assert answer["ended"] and answer["generated_ids"][-1] == im_end, answer
    limit = json.loads((smollm2_run / "config.json").read_text())["max_new_tokens"]
    assert all(len(p["generated_ids"]) == limit for p in pairs if not p["ended"])


def test_a_real_chat_models_stored_opponent_logps_match_an_independent_float64_pass_padded_or_packed(smollm2_run):
    from transformers import AutoModelForCausalLM

    pairs = read_jsonl(smollm2_run / "iter0" / "synthetic.jsonl")
    stored = {s["id"]: s for s in read_jsonl(smollm2_run / "iter0" / "opponent_logps.jsonl")}
    start = json.loads((smollm2_run / "config.json").read_text())["model"]  # θ_0: the SFT start, saved as safetensors
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float64).eval()
    for p in pairs[:3]:
        for key, name in (("real_ids", "opponent_real_logp"), ("generated_ids", "opponent_generated_logp")):
            ids = torch.tensor([p["prompt_ids"] + p[key]])  # one sequence, no padding
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].log_softmax(-1)  # position i predicts token i + 1
            n = len(p["prompt_ids"])
            expected = sum(logprobs[i - 1, ids[0, i]].item() for i in range(n, ids.shape[1]))
            assert stored[p["id"]][name] == pytest.approx(expected, abs=2e-3)
    # The scoring path packed without padding (the default, though this run kept padded rows) gives the padded numbers.
    prompts, replies = [p["prompt_ids"] for p in pairs for _ in (0, 1)], [p[k] for p in pairs for k in ("real_ids", "generated_ids")]
    assert logps.packs(model) and len(batching.pack([data.build_sequence(x, y, 128, 192) for x, y in zip(prompts, replies)])
                                      ["input_ids"]) < len(prompts)  # fewer rows than sequences: really packed
    with torch.no_grad():
        padded, _ = logps.score(model, prompts, replies, logps.Scoring(128, 192))
        packed, _ = logps.score(model, prompts, replies, logps.Scoring(128, 192, padding_free=True))
    assert torch.allclose(packed, padded, atol=1e-4)
    assert padded.tolist()[:2] == pytest.approx([stored[pairs[0]["id"]]["opponent_real_logp"],
                                                 stored[pairs[0]["id"]]["opponent_generated_logp"]], abs=2e-3)


def test_a_real_chat_models_checkpoints_load_and_answer(smollm2_run):
    tokenizer, model = models.load_model(str(smollm2_run / "iter1" / "model"))
    chat = data.ChatFormat(tokenizer)
    prompt = chat.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    [answer] = spin.gen.generate(model, tokenizer, [prompt], spin.gen.Sampling(max_new_tokens=12, do_sample=False))
    assert "Paris" in answer["text"]
    evaluation = read_jsonl(smollm2_run / "evaluation.jsonl")
    assert [row["model"] for row in evaluation] == [0, 1, 2]
    assert all(row["eval_prompts"] == 4 and row["eval_real_logp"] < 0 for row in evaluation)


def test_a_resumed_run_reuses_the_prompt_ids_it_rendered_first(small_sft_model, tmp_path):
    """Templates that print today's date (Llama-3.2's) render differently on another day: a resumed
    run must train on the ids its first day rendered, kept in tokens.jsonl. Here the template changes."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(small_sft_model, model)
    flags = toy_run(model, tmp_path / "run", "--max_samples", 16, "--eval_samples", 0, "--per_device_train_batch_size", 16,
                    "--max_length", 64, "--max_prompt_length", 48, "--max_new_tokens", 8)
    spin.main([*flags, "--iters", "1"])
    saved = (tmp_path / "run" / "tokens.jsonl").read_text()
    template = model / "chat_template.jinja"
    template.write_text("<|system|>\nToday is another day.</s>\n" + template.read_text())  # "the next day"
    spin.main([*flags, "--iters", "2"])
    assert (tmp_path / "run" / "tokens.jsonl").read_text() == saved
    first, second = (read_jsonl(tmp_path / "run" / f"iter{t}" / "synthetic.jsonl") for t in range(2))
    assert [p["prompt_ids"] for p in second] == [p["prompt_ids"] for p in first]
    assert data.ChatFormat(models.load_model(str(model))[0]).prompt_ids(first[0]["real"][:1]) != first[0]["prompt_ids"]
