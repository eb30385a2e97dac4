"""data.py: the schemas, the one renderer, truncation and the -100 masks."""
import json

import pytest

import data
from loss import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3=5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "It is 8."},
]


def labelled(sequence):
    return [t for t in sequence["labels"] if t != IGNORE_INDEX]


@pytest.mark.parametrize("turn, response", [("first", "2+3=5"), ("last", "It is 8.")])
def test_labels_decode_to_exactly_the_response_plus_eos(tokenizer, turn, response):
    row = data._normalize(0, {"messages": CONVERSATION}, turn)
    assert row["response"] == response
    assert row["messages"][0]["role"] == "system"  # the system prompt stays in the prompt
    prompt_ids = data.ChatFormat(tokenizer).prompt_ids(row["messages"])
    sequence = data.build_sequence(prompt_ids, data.ChatFormat(tokenizer).reply_ids(row["messages"], row["response"]), 512, 1024)
    assert tokenizer.decode(labelled(sequence)) == response + tokenizer.eos_token
    assert sequence["input_ids"][: len(prompt_ids)] == prompt_ids  # the response follows the prompt ids
    # and the whole sequence is what the chat template renders for the full conversation
    full = tokenizer.apply_chat_template(row["messages"] + [{"role": "assistant", "content": response}], tokenize=False)
    assert tokenizer.decode(sequence["input_ids"]) + "\n" == full


def test_a_cut_response_is_trained_without_eos(tokenizer):
    prompt_ids = data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": "12+34"}])
    response_ids = data.ChatFormat(tokenizer).reply_ids([{"role": "user", "content": "12+34"}], "12+34=46")
    sequence = data.build_sequence(prompt_ids, response_ids, 512, len(prompt_ids) + 5)
    assert tokenizer.decode(labelled(sequence)) == "12+34"
    assert tokenizer.eos_token_id not in labelled(sequence)


def test_a_long_prompt_is_cut_from_the_left_and_keeps_the_assistant_header(tokenizer):
    prompt_ids = data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": "x" * 50}])
    sequence = data.build_sequence(prompt_ids, data.ChatFormat(tokenizer).reply_ids([{"role": "user", "content": "x" * 50}], "ok"), 8, 20)
    assert sequence["input_ids"][:8] == prompt_ids[-8:]
    assert tokenizer.decode(sequence["input_ids"][:8]).endswith("</s>\n<|assistant|>\n")
    assert tokenizer.decode(labelled(sequence)) == "ok</s>"


def test_collate_pads_labels_with_ignore_index(tokenizer):
    batch = data.collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
                          {"input_ids": [5], "labels": [IGNORE_INDEX]}], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 3, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


SCHEMAS = {
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "official": {"real": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                 "generated": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
    "columns": {"prompt": "hi", "response": "hello"},
}


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_schema_and_file_type_gives_the_same_rows(tmp_path, schema, suffix):
    records = [SCHEMAS[schema]] * 2
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        import datasets

        datasets.Dataset.from_list(records).to_parquet(str(path))
    rows = data.load_rows(str(path))
    assert rows == [{"id": i, "messages": [{"role": "user", "content": "hi"}], "response": "hello"} for i in range(2)]


@pytest.mark.parametrize("record, message", [
    ({"question": "hi", "answer": "x"}, "row 1: no 'messages', 'real' or 'prompt'+'response' column"),
    ({"prompt": "hi", "response": "   "}, "row 1: the human response is empty"),
    ({"prompt": "hi", "response": 3}, "row 1: assistant content is not a string"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "row 1: roles must alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "row 1: roles must alternate"),
    ({"messages": [{"role": "user", "content": "a"}]}, "row 1: no assistant message"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "row 1: unknown role 'robot'"),
    ({"messages": "hello"}, "row 1: messages must be a list"),
])
def test_bad_rows_name_the_row(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "fine", "response": "fine"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(data.DataError) as error:
        data.load_rows(str(path))
    assert str(error.value).startswith(f"--dataset {path}, {message}")  # the flag, the file, the row


def test_toy_rows_follow_p_data():

    rows = data.toy_rows("train")
    assert len(rows) == 2000 and not {r["messages"][0]["content"] for r in rows} & {
        r["messages"][0]["content"] for r in data.toy_rows("test")}  # held-out prompts are held out
    short = sum(r["response"] == str(sum(map(int, r["messages"][0]["content"].split("+")))) for r in rows)
    assert 0.45 < short / len(rows) < 0.55  # the form "s" has probability 0.5 (binomial sd 0.011)
    assert data.toy_p_data("3+3") == {"6": 0.5, "3+3=6": 0.5}  # forms that coincide add up


def test_a_directory_of_shards_in_the_official_spin_layout_loads_as_load_dataset_reads_it(tmp_path):
    """A downloaded UCLA-AGI/SPIN_iter0: split files of rows with `real` and `generated` conversations."""
    import datasets

    def row(i):
        user = {"role": "user", "content": f"question {i}"}
        return {"real": [user, {"role": "assistant", "content": f"human answer {i}"}],
                "generated": [user, {"role": "assistant", "content": f"model answer {i}"}]}

    for shard in range(2):
        datasets.Dataset.from_list([row(shard * 3 + i) for i in range(3)]).to_parquet(
            str(tmp_path / f"train-0000{shard}-of-00002.parquet"))
    datasets.Dataset.from_list([row(9)]).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    rows = data.load_rows(str(tmp_path))
    assert [r["response"] for r in rows] == [f"human answer {i}" for i in range(6)]  # both shards, in order
    assert rows[0]["messages"] == [{"role": "user", "content": "question 0"}]
    assert [r["response"] for r in data.load_rows(str(tmp_path), split="test")] == ["human answer 9"]
    with pytest.raises(data.DataError, match="could not be read as a data set, split 'validation'"):
        data.load_rows(str(tmp_path), split="validation")


def test_every_random_stream_of_a_run_has_its_own_seed():
    """The streams of one run never share a seed, however many ranks, epochs or batches: before, the order
    of (t=0, epoch=n) and a rank's sampling batch n of iteration 0 both drew from --seed + n."""
    keys = [(stream, t, rank, epoch, batch) for stream in data.STREAMS for t in range(4) for rank in range(64)
            for epoch in range(3) for batch in range(6)]
    seeds = {data.seed(42, *key) for key in keys}
    assert len(seeds) == len(keys)
    assert data.seed(42, "order", 1, epoch=1) == data.seed(42, "order", 1, epoch=1)  # a resumed run redraws it
    assert all(0 <= s < 2**63 for s in seeds)  # torch.manual_seed's range
