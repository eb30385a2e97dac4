"""The SFT data set {(x, y)}, y ~ p_data(·|x), and how a (prompt, response) becomes tokens.

SPIN (Algorithm 1 of arXiv 2401.01335v3) needs no data beyond the SFT set: each row gives a
prompt x and the human ("real") response y. Sources:
  - a Hugging Face Hub data set by name (UltraChat 200k's `messages` schema), e.g.
    `HuggingFaceH4/ultrachat_200k` with `--dataset_split train_sft`;
  - a local .jsonl / .json / .parquet file with a `messages` column, the official SPIN `real`
    column (a user and an assistant message; `generated` is ignored: we sample our own), or plain
    `prompt` / `response` columns;
  - `toy`: the embedded toy data set (toy.py).

Every row becomes {"id", "messages" (the prompt conversation), "response" (a string)}.

Tokens. One renderer (the tokenizer's chat template) makes the prompt ids used for BOTH
generation and training. A response is tokenized on its own and appended to those ids, and a
generated response keeps the exact ids the model sampled, so the prompt/response boundary in
training is the one the model generated from. Prompts are cut from the left (the end, with the
assistant header, is what the response follows); responses are cut to fit max_length, and a
response that was cut (no EOS) is trained without an EOS.
"""
import json
from pathlib import Path

import torch

from loss import IGNORE_INDEX


class DataError(ValueError):
    """Bad input data: the message names the row and is shown to the user as one line."""


def load_rows(source: str, split: str = "train", turn: str = "first", flag: str = "--dataset") -> list[dict]:
    """Rows in the common schema from the toy, a local file or the Hub; errors name `flag`."""
    if source == "toy":
        import toy

        return toy.make_rows(split)
    path = Path(source)
    if path.exists():
        table = _read_local(path)
    else:
        table = _read_hub(source, split, flag)
    try:
        rows = [_normalize(i, record, turn) for i, record in enumerate(table)]
    except DataError as e:
        raise DataError(f"{flag} {source}, {e}") from None
    if not rows:
        raise DataError(f"{flag} {source}: the data set has no rows")
    return rows


def _read_local(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n + 1} is not valid JSON ({e.msg})") from None
        return records
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return records
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def _read_hub(name: str, split: str, flag: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:  # offline, misspelled, gated: the datasets library raises many kinds
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{flag} {name}: not a local file and could not be loaded from the Hugging Face Hub "
            f"({first_line}); download it where there is network and pass the local .jsonl/.parquet path"
        ) from None


def _normalize(i: int, record, turn: str) -> dict:
    """One source row -> {"id", "messages", "response"}; the error names the row (0-based)."""
    if not isinstance(record, dict):
        raise DataError(f"row {i}: expected an object with columns, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "real" in record:
        messages = record["real"]  # official SPIN schema: [user, assistant]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise DataError(f"row {i}: no 'messages', 'real' or 'prompt'+'response' column "
                        f"(found: {', '.join(sorted(record)) or 'none'})")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"row {i}: messages must be a list of {{'role', 'content'}} objects")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"row {i}: unknown role {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"row {i}: {m.get('role')} content is not a string")
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise DataError(f"row {i}: no assistant message to use as the human response")
    # The paper's recipe: the first user turn is the prompt and the first reply the ground truth.
    # turn="last" keeps the whole conversation before the last reply as the prompt instead.
    k = replies[0] if turn == "first" else replies[-1]
    context = messages[:k]
    roles = [m["role"] for m in context if m["role"] != "system"]
    if not roles or roles[0] != "user" or roles[-1] != "user" or any(r == roles[j - 1] for j, r in enumerate(roles) if j):
        raise DataError(f"row {i}: roles must alternate user/assistant and a user turn must precede "
                        f"the response (got {[m['role'] for m in messages[:k + 1]]})")
    response = messages[k]["content"]
    if not response.strip():
        raise DataError(f"row {i}: the human response is empty")
    return {"id": i, "messages": context, "response": response}  # id: the row's place in the source


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids, through the chat template, ending with the assistant header.

    Rendered to text and then tokenized without special tokens: templates that write the BOS
    themselves (Llama's) would otherwise get a second one.
    """
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template; use a chat/SFT model or add one to its "
                        "tokenizer_config.json")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, text: str) -> list[int]:
    """A complete human response: its tokens, then EOS, as the chat template ends a reply."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def build_sequence(prompt_ids: list[int], response_ids: list[int], max_prompt_length: int,
                   max_length: int) -> dict:
    """input_ids = prompt + response; labels = IGNORE_INDEX on the prompt, the response ids on it."""
    prompt_ids = prompt_ids[-max_prompt_length:]  # from the left: keep the assistant header
    response_ids = response_ids[: max_length - len(prompt_ids)]  # a cut response loses its EOS
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def collate(sequences: list[dict], pad_token_id: int) -> dict:
    """Right-pad to the longest sequence; padding gets label IGNORE_INDEX and attention 0."""
    width = max(len(s["input_ids"]) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(sequences):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
