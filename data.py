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
  - `toy`: the embedded toy's data set, whose p_data is written down (toy_rows; its model: toy.py).

Every row becomes {"id", "messages" (the prompt conversation), "response" (a string)}.

Tokens (ChatFormat). The tokenizer's chat template writes everything: the prompt ids, with the
assistant header, are what generation continues AND what training conditions on; the human
reply's ids are read off the template's rendering of the whole conversation after the prompt's
ids, through the end-of-turn token; a generated reply keeps the exact ids the model sampled,
through its stop id. So real and generated replies differ only in what the model would say.
How the ids become a sequence, cut to the length limits (build_sequence), and sequences a padded
batch (collate): below; packed rows, the fast layout: machinery/batching.py.
"""
import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from loss import IGNORE_INDEX


class DataError(ValueError):
    """Bad input data: the message names the row and is shown to the user as one line."""


def load_rows(source: str, split: str = "train", turn: str = "first", flag: str = "--dataset",
              revision: str | None = None, config: str | None = None) -> list[dict]:
    """Rows in the common schema from "toy", "chitchat", a local file or directory, or the Hub (its
    configuration `config`, at `revision`); errors name `flag`."""
    path = Path(source)
    if source == TOY:
        return toy_rows(split)
    if source == CHITCHAT:
        table = chitchat_records(split, flag)
    elif path.is_dir():
        table = _read_hub(str(path), split, flag, None, config)  # as datasets reads a repository
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


TOY, CHITCHAT = "toy", "chitchat"

# The toy's data set: prompt "a+b" (a, b < 100), p_data(y|x) known exactly (toy.py measures
# models against it).
TOY_FORMS = [("{s}", 0.5), ("{a}+{b}={s}", 0.3), ("{b}+{a}={s}", 0.2)]  # p_data(y|x)
TOY_TEST = 200  # held-out prompts, never trained on


def toy_p_data(prompt: str) -> dict[str, float]:
    """The true response distribution of one toy prompt "a+b" (forms can coincide when a == b)."""
    a, b = prompt.split("+")
    probs: dict[str, float] = {}
    for form, p in TOY_FORMS:
        response = form.format(a=a, b=b, s=int(a) + int(b))
        probs[response] = probs.get(response, 0.0) + p
    return probs


def toy_rows(split: str, num_prompts: int = 2000, seed: int = 0) -> list[dict]:
    """The toy's rows in the common schema; each human response is one draw from p_data."""
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(pairs)  # fixed: the test prompts never change
    if split == "test":
        chosen = pairs[:TOY_TEST]
    elif split == "validation":  # after all training prompts: for choosing settings (experiments/)
        chosen = pairs[-TOY_TEST:]
    else:
        chosen = pairs[TOY_TEST:TOY_TEST + num_prompts]
    rng = random.Random(seed)
    rows = []
    for i, (a, b) in enumerate(chosen):
        prompt = f"{a}+{b}"
        responses, probs = zip(*toy_p_data(prompt).items())
        response = rng.choices(responses, weights=probs)[0]
        rows.append({"id": i, "messages": [{"role": "user", "content": prompt}],
                     "response": response})
    return rows




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
        raise DataError(f"{flag} {CHITCHAT} needs the chitchat-dataset package: pip install -r "
                        f"requirements-real.txt") from None
    kept = [pair for i, pair in enumerate(pairs)
            if split is None or (i % 10 == 9) == (split == "test")]  # every 10th chat is "test"
    return [{"messages": [{"role": "user", "content": first},
                          {"role": "assistant", "content": reply}]} for first, reply in kept]


@functools.lru_cache(maxsize=1)
def _chitchat_pairs() -> tuple[tuple[str, str], ...]:
    """(first turn, reply) of every kept chat, in key order: the package's 39 MB file, read once."""
    import importlib.resources

    path = importlib.resources.files("chitchat_dataset") / "dataset.json"
    chats = json.loads(path.read_text(encoding="utf-8"))
    pairs = []
    for key in sorted(chats):
        groups = chats[key]["messages"][:2]  # a chat's first two turns, each a list of messages
        turns = ["\n".join(m["text"].strip() for m in group) for group in groups]
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


def _read_hub(name: str, split: str, flag: str, revision: str | None = None,
              config: str | None = None) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, revision=revision).to_list()
    except Exception as e:  # offline, misspelled, gated: the datasets library raises many kinds
        if Path(name).is_dir():
            raise DataError(f"{flag} {name}: the directory could not be read as a data set, "
                            f"split {split!r} ({first_line(e)}); it needs .parquet/.jsonl/.json "
                            f"files") from None
        raise DataError(
            f"{flag} {name}: not a local file and could not be loaded from the Hugging Face Hub "
            f"({first_line(e)}); download it where there is network and pass the local .jsonl or "
            f".parquet path"
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
    alternate = all(r != roles[j - 1] for j, r in enumerate(roles) if j)
    if not roles or roles[0] != "user" or roles[-1] != "user" or not alternate:
        raise DataError(f"row {i}: roles must alternate user/assistant and a user turn must "
                        f"precede the response (got {[m['role'] for m in messages[:k + 1]]})")
    response = messages[k]["content"]
    if not response.strip():
        raise DataError(f"row {i}: the human response is empty")
    return {"id": i, "messages": context, "response": response}  # id: the row's place in the source


def subsample(rows: list, n: int, seed: int) -> list:
    """n of the rows drawn with `seed`, in their order (all of them when n is not smaller)."""
    if n >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def cut_prompt(prompt_ids: list[int], max_prompt_length: int) -> list[int]:
    """A prompt cut to --max_prompt_length from the left: its end, the assistant header the reply
    follows, is kept. The one place a prompt is cut (training, scoring, sampling, held-out)."""
    return prompt_ids[-max_prompt_length:]


def build_sequence(prompt_ids: list[int], response_ids: list[int], max_prompt_length: int,
                   max_length: int) -> dict:
    """input_ids = prompt + response; labels: IGNORE_INDEX on the prompt, the response ids on it."""
    prompt_ids = cut_prompt(prompt_ids, max_prompt_length)
    response_ids = response_ids[: max_length - len(prompt_ids)]  # a cut response loses its EOS
    return {"input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def collate(sequences: list[dict], pad_token_id: int = 0) -> dict:
    """Right-pad to the longest sequence; padding gets label IGNORE_INDEX and attention 0. Which id
    pads does not matter: right padding comes after every real token, so causal attention never
    lets a real position see it, and its own outputs are never scored."""
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


def spin_pair(row: dict, prompt_ids: list[int], real_ids: list[int], sample: dict, t: int) -> dict:
    """One (x, y, y') row of iteration t: in the official SPIN schema (conversations `real` and
    `generated`, usable as --dataset), plus the exact token ids of the prompt and both replies."""
    return {"id": row["id"], "iteration": t,
            "real": row["messages"] + [{"role": "assistant", "content": row["response"]}],
            "generated": row["messages"] + [{"role": "assistant", "content": sample["text"]}],
            "ended": sample["ended"], "prompt_ids": prompt_ids, "real_ids": real_ids,
            "generated_ids": sample["generated_ids"]}


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

    PROBE = [{"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": "It is 4."}]

    def __init__(self, tokenizer, system_prompt: str | None = None,
                 template_kwargs: dict | None = None, name: str = "the model"):
        if not tokenizer.chat_template:
            raise DataError(f"{name}: the tokenizer has no chat template; use a chat/SFT model or "
                            f"add a chat_template to its tokenizer_config.json")
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        self.template_kwargs = template_kwargs or {}
        self.name, self.not_prefix_stable = name, 0
        try:
            with_header = self._render(self.PROBE[:1], add_generation_prompt=True)
            without = self._render(self.PROBE[:1], add_generation_prompt=False)
        except DataError as e:
            what = (f"--system_prompt {system_prompt!r}: " if system_prompt is not None else "")
            if self.template_kwargs:
                what += f"--chat_template_kwargs {json.dumps(self.template_kwargs)}: "
            message = str(e).replace("the chat template", f"the chat template of {name}")
            raise DataError(f"{what}{message}") from None
        if with_header == without:
            raise DataError(f"{name}: its chat template writes nothing for add_generation_prompt"
                            f"=True (no assistant header), so a prompt cannot be told from a "
                            f"finished conversation")
        added = tokenizer.added_tokens_decoder.items()
        special = set(tokenizer.all_special_ids) | {i for i, t in added if t.special}
        # The end-of-turn token: the first special token the template writes after a reply.
        after_reply = self._after_prompt(self.PROBE[:1], self.PROBE[1]["content"])[1]
        self.end_of_turn = next((i for i in after_reply if i in special), None)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        try:
            return self.tokenizer.apply_chat_template(messages,
                                                      add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **self.template_kwargs)
        except Exception as e:  # jinja2's TemplateError (a template's raise_exception), TypeError
            raise DataError(f"the chat template cannot render this conversation "
                            f"({first_line(e)})") from None

    def _ids(self, text: str) -> list[int]:
        # No special tokens added: the template writes the BOS itself where a model has one.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """x through the chat template, ending with the assistant header: what generation
        continues."""
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
            token = self.tokenizer.convert_ids_to_tokens(self.end_of_turn)
            raise DataError(f"the chat template wrote no end-of-turn token {token!r} after the "
                            f"reply")
        last = len(ids) - ids[::-1].index(self.end_of_turn)  # through the last end-of-turn
        return prompt, ids[:last]

    def _after_prompt(self, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
        """(the prompt's ids, the ids of the whole conversation after them). Where the full
        rendering does not start with the prompt's ids (a template that is not prefix-stable: the
        reply's first characters merge with the header's last token), the text after the prompt's
        text, tokenized on its own; such rows are counted in not_prefix_stable for the log."""
        prompt_text = self._render(messages, add_generation_prompt=True)
        full_text = self._render(messages + [{"role": "assistant", "content": reply}],
                                 add_generation_prompt=False)
        prompt, full = self._ids(prompt_text), self._ids(full_text)
        if full[: len(prompt)] == prompt:
            return prompt, full[len(prompt):]
        if not full_text.startswith(prompt_text):
            raise DataError("the chat template writes the prompt differently when a reply follows "
                            "it")
        self.not_prefix_stable += 1
        return prompt, self._ids(full_text[len(prompt_text):])


STREAMS = ("samples", "heldout", "order", "batch")  # what a run draws random numbers for


def seed(base: int, stream: str, t: int, rank: int = 0, epoch: int = 0, batch: int = 0) -> int:
    """The seed of one random stream of a run, from --seed (base) and the whole key of the stream:
      "samples": y' ~ p_θt, iteration t's synthetic responses on one rank (and the showcase sample);
      "heldout": θ_t's responses to the held-out prompts (evaluation.py);
      "order":   the training order of iteration t's pairs in one epoch;
      "batch":   one generation batch's stream, from its caller's seed (generate.generate).
    numpy's SeedSequence hashes the key, so different keys give unrelated seeds: no two streams
    share one, however many ranks, epochs or batches (sums of offsets did: base + epoch was also
    base + batch).
    The key has a fixed length: SeedSequence treats a trailing 0 as absent."""
    import numpy

    key = [base, STREAMS.index(stream), t, rank, epoch, batch]
    state = numpy.random.SeedSequence(key).generate_state(1, numpy.uint64)[0]
    return int(state >> 1)  # < 2**63: torch.manual_seed's range


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise paragraphs), or its type."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
