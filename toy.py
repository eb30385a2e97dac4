"""The embedded toy: a task with a KNOWN p_data, a tiny Mistral and its weak SFT start.

SPIN's claim (Section 5, Theorem 5.2) is that self-play moves p_θ toward p_data using only the
SFT data. On a real model p_data is unknown; here it is written down, so the distance of the
model to it can be computed exactly:

  prompt x:  "a+b" with a, b in 0..99
  p_data(y|x): "s" with probability 0.5, "a+b=s" with 0.3, "b+a=s" with 0.2   (s = a + b)

The model is `MistralForCausalLM` (zephyr-7b's architecture) at 0.4M parameters, with a
character-level tokenizer built locally by the `tokenizers` library and a zephyr-style chat
template. The "weak" starting model p_θ0 is a short SFT warm-up on the human responses, cached
on disk under a key of its settings. Nothing here downloads anything.

    python toy.py            # builds (or finds) the weak SFT model and prints its directory
"""
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import data
from loss import sequence_logps

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
# zephyr's template: <|user|>\n{content}</s>\n<|assistant|>\n{content}</s>\n
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SFT = dict(  # the weak starting model: these settings are the cache key
    hidden_size=128,  # 0.4M parameters: trains in seconds on 2 CPU cores
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in Mistral-7B
    intermediate_size=256,
    sft_steps=400,  # stopped early on purpose: p_θ0 must clearly differ from p_data
    sft_batch_size=64,
    sft_learning_rate=1e-3,
    num_prompts=2000,  # the SFT data set that SPIN reuses
    seed=0,
    version=3,  # bump when the toy or the code that trains it changes: 3 = loss.sequence_logps
)


def build_tokenizer():
    """A character-level tokenizer with zephyr's chat markers as single special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    every_char = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.pre_tokenizer = every_char
    backend.decoder = decoders.Fuse()  # without it decode() puts a space between characters
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", chat_template=CHAT_TEMPLATE,
    )


def new_model(tokenizer, settings: dict):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(settings["seed"])
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        num_key_value_heads=settings["num_key_value_heads"],
        max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MistralForCausalLM(config)


def sft_model_path(cache_dir: str | None = None, **overrides) -> Path:
    """The directory of the weak SFT model; built on first use (≈20 s on 2 cores), then reused."""
    settings = {**SFT, **overrides}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("SPIN_CACHE", Path.home() / ".cache" / "spin"))
    path = root / f"toy-sft-{key}"
    if (path / "config.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = new_model(tokenizer, settings)
    sft(model, tokenizer, settings)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))  # written whole, then renamed
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "toy_settings.json").write_text(json.dumps(settings, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # another process built the same model meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def sft(model, tokenizer, settings: dict) -> None:
    """Supervised fine-tuning: maximise the mean per-token log-likelihood of the human responses."""
    rows = data.toy_rows("train", settings["num_prompts"], settings["seed"])
    chat = data.ChatFormat(tokenizer)
    sequences = [data.build_sequence(chat.prompt_ids(r["messages"]),
                                     chat.reply_ids(r["messages"], r["response"]),
                                     64, 128) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["sft_learning_rate"])
    generator = torch.Generator().manual_seed(settings["seed"])
    model.train()
    start = time.time()
    for step in range(settings["sft_steps"]):
        index = torch.randint(len(sequences), (settings["sft_batch_size"],), generator=generator)
        batch = data.collate([sequences[i] for i in index], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        num_tokens = (batch["labels"][:, 1:] != -100).sum()
        loss = -sequence_logps(logits, batch["labels"]).sum() / num_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"toy: SFT warm-up of the weak start, {settings['sft_steps']} steps in "
          f"{time.time() - start:.0f}s, last loss {loss.item():.3f} per token")


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], generated: list[dict]) -> dict:
    """Task metrics on held-out rows, given the model's greedy responses to them.

    accuracy: the greedy response is a valid answer (in the support of p_data).
    tv_distance: total variation between p_θ(·|x) and p_data(·|x), exact, mean over prompts. Every
      string outside the support of p_data is one lump of p_θ mass, 1 − Σ_valid p_θ(y|x).
    valid_mass: mean Σ_valid p_θ(y|x), the probability that a T=1 sample is a valid answer.
    """
    model.eval()
    device = next(model.parameters()).device
    correct, tv, valid_mass = 0, 0.0, 0.0
    chat = data.ChatFormat(tokenizer)
    for row, gen in zip(rows, generated):
        truth = data.toy_p_data(row["messages"][-1]["content"])
        correct += gen["ended"] and gen["text"] in truth
        prompt_ids = chat.prompt_ids(row["messages"])
        replies = [chat.reply_ids(row["messages"], y) for y in truth]
        sequences = [data.build_sequence(prompt_ids, reply, 64, 128) for reply in replies]
        batch = data.collate(sequences, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        p_model = sequence_logps(logits, batch["labels"].to(device)).exp().tolist()
        mass = sum(p_model)
        tv += 0.5 * (sum(abs(pm - pd) for pm, pd in zip(p_model, truth.values())) + (1.0 - mass))
        valid_mass += mass
    n = len(rows)
    return {"accuracy": correct / n, "tv_distance": tv / n, "valid_mass": valid_mass / n}


if __name__ == "__main__":  # its metrics: the "start" row of `python spin.py`
    print(sft_model_path())
