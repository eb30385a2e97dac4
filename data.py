"""The SFT data set {(x, y)}, y ~ p_data(·|x), and how a (prompt, response) becomes tokens.

SPIN (Algorithm 1 of arXiv 2401.01335v3) needs no data beyond the SFT set: each row gives a
prompt x and the human ("real") response y. Sources:
  - a Hugging Face Hub data set by name (UltraChat 200k's `messages` schema), e.g.
    `HuggingFaceH4/ultrachat_200k` with `--dataset_split train_sft`;
  - a local .jsonl / .json / .parquet file, or a directory of them as `datasets.load_dataset(DIR)`
    reads it (a downloaded `UCLA-AGI/SPIN_iter0`, split files like train-*.parquet), with a
    `messages` column, the official SPIN `real` column (a user and an assistant message;
    `generated` is ignored: we sample our own), or plain `prompt` / `response` columns;
  - `chitchat`: real human conversations that the chitchat-dataset package ships;
  - `toy`: the embedded toy data set (toy.load_rows resolves the name; this module knows no toy).

Every row becomes {"id", "messages" (the prompt conversation), "response" (a string)}.

Tokens (ChatFormat). The tokenizer's chat template writes everything: the prompt ids, with the
assistant header, are what generation continues AND what training conditions on; the human
reply's ids are read off the template's rendering of the whole conversation after the prompt's
ids, through the end-of-turn token; a generated reply keeps the exact ids the model sampled,
through its stop id. So real and generated replies differ only in what the model would say.
How the ids become a sequence, cut to the length limits, and sequences a batch: batching.py.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data: the message names the row and is shown to the user as one line."""


def load_rows(source: str, split: str = "train", turn: str = "first", flag: str = "--dataset",
              revision: str | None = None, config: str | None = None) -> list[dict]:
    """Rows in the common schema from "chitchat", a local file or directory, or the Hub (its
    configuration `config`, at `revision`); errors name `flag`."""
    path = Path(source)
    if source == CHITCHAT:
        table = chitchat_records(split, flag)
    elif path.is_dir():
        table = _read_hub(str(path), split, flag, None, config)  # datasets reads a directory as it reads a repository
    elif path.exists():
        table = _read_local(path)
    else:
        table = _read_hub(source, split, flag, revision, config)
    try:
        rows = [_normalize(i, record, turn) for i, record in enumerate(table)]
    except DataError as e:
        raise DataError(f"{flag} {source}, {e}") from None
    if not rows:
        raise DataError(f"{flag} {source}: the data set has no rows")
    return rows


CHITCHAT = "chitchat"


def chitchat_records(split: str | None, flag: str = "--dataset") -> list[dict]:
    """Real human conversations that a package ships (chitchat-dataset, MIT: 7,168 open-domain chats
    between people): a person's first turn and the other person's reply, each turn the sender's
    consecutive messages joined by newlines, kept when the reply has 2 to 30 words. Splits: "test"
    is every 10th kept chat in key order, "train" the others, None all of them."""
    if split not in (None, "train", "test"):
        raise DataError(f"{flag} {CHITCHAT}: no split {split!r} (train, test)")
    try:
        pairs = _chitchat_pairs()
    except ModuleNotFoundError:
        raise DataError(f"{flag} {CHITCHAT} needs the chitchat-dataset package: pip install -r requirements-real.txt") from None
    return [{"messages": [{"role": "user", "content": first}, {"role": "assistant", "content": reply}]}
            for i, (first, reply) in enumerate(pairs) if split is None or (i % 10 == 9) == (split == "test")]


@functools.lru_cache(maxsize=1)
def _chitchat_pairs() -> tuple[tuple[str, str], ...]:
    """(first turn, reply) of every kept chat, in key order: the package's 39 MB file, parsed once."""
    import importlib.resources

    chats = json.loads((importlib.resources.files("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    pairs = []
    for key in sorted(chats):
        turns = ["\n".join(m["text"].strip() for m in group) for group in chats[key]["messages"][:2]]
        if len(turns) == 2 and all(turns) and 2 <= len(turns[1].split()) <= 30:
            pairs.append((turns[0], turns[1]))
    return tuple(pairs)


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


def _read_hub(name: str, split: str, flag: str, revision: str | None = None, config: str | None = None) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, revision=revision).to_list()
    except Exception as e:  # offline, misspelled, gated: the datasets library raises many kinds
        if Path(name).is_dir():
            raise DataError(f"{flag} {name}: the directory could not be read as a data set, split {split!r} "
                            f"({first_line(e)}); it needs .parquet/.jsonl/.json files") from None
        raise DataError(
            f"{flag} {name}: not a local file and could not be loaded from the Hugging Face Hub "
            f"({first_line(e)}); download it where there is network and pass the local .jsonl/.parquet path"
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


@dataclass
class RunData:
    """A run's data as tokens, rendered once (spin.prepare): the training rows, their prompt ids
    (cut to --max_prompt_length) and human reply ids, the held-out set, and the stop ids."""
    rows: list[dict]
    prompts: list[list[int]]
    real_ids: list[list[int]]
    heldout: dict  # {"rows", "prompts", "real_ids"}
    stop: list[int]


class ChatFormat:
    """The tokens of a conversation exactly as the tokenizer's chat template writes them.

    prompt_ids(x): x rendered with the assistant header (add_generation_prompt), what the opponent
    generates after. reply_ids(x, y): the whole conversation rendered with the reply y, read off
    AFTER the prompt's ids and kept through the end-of-turn token the template writes; what the
    template writes after it (a newline, a second EOS) belongs to no reply, real or generated.
    So a real reply starts with the token the model would produce there (a SentencePiece reply
    tokenized alone would start with "▁") and ends with the template's end-of-turn marker
    (Llama-3's <|eot_id|>, Phi-3's <|end|>, ChatML's <|im_end|>, zephyr's </s>), which is also a
    stop id of generation (generate.stop_ids).

    system_prompt: None renders the conversation as it is; a string (also "") inserts a system turn
    where the conversation has none, as alignment-handbook trained zephyr-7b-sft-full.
    template_kwargs: keyword arguments for the template, e.g. {"enable_thinking": False} (Qwen3).
    """

    PROBE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]

    def __init__(self, tokenizer, system_prompt: str | None = None, template_kwargs: dict | None = None,
                 name: str = "the model"):
        if not tokenizer.chat_template:
            raise DataError(f"{name}: the tokenizer has no chat template; use a chat/SFT model or add a "
                            f"chat_template to its tokenizer_config.json")
        self.tokenizer, self.system_prompt, self.template_kwargs = tokenizer, system_prompt, template_kwargs or {}
        self.name, self.not_prefix_stable = name, 0
        try:
            with_header = self._render(self.PROBE[:1], add_generation_prompt=True)
            without = self._render(self.PROBE[:1], add_generation_prompt=False)
        except DataError as e:
            what = (f"--system_prompt {system_prompt!r}: " if system_prompt is not None else "") + \
                   (f"--chat_template_kwargs {json.dumps(self.template_kwargs)}: " if self.template_kwargs else "")
            raise DataError(f"{what}{str(e).replace('the chat template', f'the chat template of {name}')}") from None
        if with_header == without:
            raise DataError(f"{name}: its chat template writes nothing for add_generation_prompt=True (no "
                            f"assistant header), so a prompt cannot be told from a finished conversation")
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        # The end-of-turn token: the first special token the template writes after the probe's reply.
        self.end_of_turn = next((i for i in self._after_prompt(self.PROBE[:1], self.PROBE[1]["content"])[1]
                                 if i in special), None)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **self.template_kwargs)
        except Exception as e:  # jinja2's TemplateError (a template's raise_exception), TypeError, ...
            raise DataError(f"the chat template cannot render this conversation ({first_line(e)})") from None

    def _ids(self, text: str) -> list[int]:
        # Without special tokens: the template writes the BOS itself where the model has one (Llama's).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """x through the chat template, ending with the assistant header: what generation continues."""
        return self._ids(self._render(messages, add_generation_prompt=True))

    def reply_ids(self, messages: list[dict], reply: str) -> list[int]:
        """y as the template writes it after prompt_ids(messages), through its end-of-turn token."""
        return self.pair(messages, reply)[1]

    def pair(self, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
        """(prompt_ids(messages), reply_ids(messages, reply)), the prompt rendered once for both."""
        prompt, ids = self._after_prompt(messages, reply)
        if self.end_of_turn is None:  # a template with no end-of-turn token: end the reply with EOS
            return prompt, ids + [self.tokenizer.eos_token_id]
        if self.end_of_turn not in ids:
            raise DataError(f"the chat template wrote no end-of-turn token "
                            f"{self.tokenizer.convert_ids_to_tokens(self.end_of_turn)!r} after the reply")
        return prompt, ids[: len(ids) - ids[::-1].index(self.end_of_turn)]  # through the last end-of-turn

    def _after_prompt(self, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
        """(the prompt's ids, the ids of the whole conversation after them). Where the full rendering does
        not start with the prompt's ids (a template that is not prefix-stable: the reply's first
        characters merge with the header's last token), the text after the prompt's text, tokenized
        on its own; such rows are counted in not_prefix_stable for the run's log."""
        prompt_text = self._render(messages, add_generation_prompt=True)
        full_text = self._render(messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
        prompt, full = self._ids(prompt_text), self._ids(full_text)
        if full[: len(prompt)] == prompt:
            return prompt, full[len(prompt):]
        if not full_text.startswith(prompt_text):
            raise DataError("the chat template writes the prompt differently when a reply follows it")
        self.not_prefix_stable += 1
        return prompt, self._ids(full_text[len(prompt_text):])


def seed(base: int, purpose: str, t: int, rank: int = 0, epoch: int = 0) -> int:
    """Every random stream of a run, derived from --seed (base), so that the same run, and a resumed
    one, draws the same numbers:
      "samples": y' ~ p_θt, iteration t's synthetic responses on one rank (and the showcase sample of θ_t);
      "heldout": θ_t's responses to the held-out prompts (evaluation.py);
      "order":   the training order of iteration t's pairs in one epoch."""
    return {"samples": base + 1_000_000 * t + 10_000 * rank,
            "heldout": base + 1_000_000 * t + 500_000,
            "order": base + 1000 * t + epoch}[purpose]


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise paragraphs), or its type."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
