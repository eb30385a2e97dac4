"""Issue 6: held-out evaluation, lm-evaluation-harness, the plot, TensorBoard, model cards.
Issue 33: the paper's evaluation (--eval_tasks paper, python -m evals.paper), run by the real
harness on its real task definitions, against a local Hugging Face cache that this file writes."""
import contextlib
import copy
import importlib.metadata
import io
import json
import math
import shutil
import struct
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import data
from machinery import evaluation
import generate
from machinery import plot
import spin
from machinery import report
from evals import paper
from huggingface_hub import ModelCard
from conftest import read_jsonl, toy_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--max_samples", "200", "--per_device_train_batch_size", "32", "--generation_batch_size", "200"]


def eval_args(pad_token_id, **overrides):
    return Namespace(**{**dict(max_new_tokens=12, greedy=False, temperature=1.0, top_p=1.0, generation_batch_size=7,
                               seed=3, quiet=True, per_device_train_batch_size=5, max_prompt_length=32, max_length=48,
                               pad_token_id=pad_token_id, bf16=False, beta=0.7, loss_type="logistic", padding_free=True,
                               fast_logps=True),
                         **overrides})


def logp_one_by_one(model, prompt_ids, response_ids):
    """log p(response|prompt) the plain way: one unpadded sequence, a full log_softmax, a loop."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    return sum(logprobs[len(prompt_ids) + i - 1, token].item() for i, token in enumerate(response_ids))


def test_heldout_numbers_equal_an_independent_computation(tokenizer, small_sft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(small_sft_model).eval()  # θ_{s−1}
    after = copy.deepcopy(before)  # θ_s: the same model, moved a little
    torch.manual_seed(5)
    after.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in before.state_dict().items()})
    rows = data.toy_rows("test")[:17]
    heldout = {"rows": rows, "prompts": [data.ChatFormat(tokenizer).prompt_ids(r["messages"]) for r in rows],
               "real_ids": [data.ChatFormat(tokenizer).reply_ids(r["messages"], r["response"]) for r in rows]}
    args = eval_args(tokenizer.pad_token_id)
    first = evaluation.sample_and_score(before, tokenizer, heldout, 0, None, args, tmp_path / "model0.jsonl")
    second = evaluation.sample_and_score(after, tokenizer, heldout, 1, first, args, tmp_path / "model1.jsonl")
    got = evaluation.metrics(second, first, args.beta, args.loss_type)

    x, y = heldout["prompts"], heldout["real_ids"]
    y0 = [r["generated_ids"] for r in first]
    held_out_stream = data.seed(3, "heldout", 0)  # θ_0's held-out samples: the "heldout" stream of --seed 3
    assert y0 == [g["generated_ids"] for g in generate.generate(before, tokenizer, x, generate.Sampling(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0, batch_size=7), seed=held_out_stream)]
    real_now = [logp_one_by_one(after, p, r) for p, r in zip(x, y)]
    real_before = [logp_one_by_one(before, p, r) for p, r in zip(x, y)]
    generated_now = [logp_one_by_one(after, p, r) for p, r in zip(x, y0)]
    generated_before = [logp_one_by_one(before, p, r) for p, r in zip(x, y0)]
    margins = [0.7 * ((a - b) - (c - d)) for a, b, c, d in zip(real_now, real_before, generated_now, generated_before)]
    n = len(rows)
    assert got["eval_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / n, abs=1e-5)
    assert got["eval_margin"] == pytest.approx(sum(margins) / n, abs=1e-4)
    assert got["eval_real_reward"] == pytest.approx(0.7 * sum(a - b for a, b in zip(real_now, real_before)) / n, abs=1e-4)
    assert got["eval_reward_accuracy"] == sum(m > 0 for m in margins) / n
    assert 0 < got["eval_reward_accuracy"] < 1  # the test can tell right from wrong
    assert got["eval_real_logp"] == pytest.approx(sum(real_now) / n, abs=1e-4)
    assert got["eval_real_logp_per_token"] == pytest.approx(sum(real_now) / sum(map(len, y)), abs=1e-5)
    assert got["eval_real_length"] == sum(map(len, y)) / n
    assert got["eval_generated_length"] == sum(len(r["generated_ids"]) for r in second) / n
    assert got["eval_ended"] == sum(tokenizer.eos_token_id in r["generated_ids"] for r in second) / n
    assert "eval_loss" not in evaluation.metrics(first, None, 0.7, "logistic")  # θ_0 has no opponent


def test_heldout_rows_are_taken_out_of_the_training_data():
    rows = [{"id": i, "messages": [], "response": str(i)} for i in range(95)]
    args = Namespace(eval_samples=200, eval_dataset=None, dataset="mine.jsonl", seed=1)
    train, held = evaluation.heldout_rows(rows, args)
    assert len(held) == 9 and len(train) == 86  # at most a tenth
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert held == evaluation.heldout_rows(rows, args)[1]  # a function of --seed
    assert evaluation.heldout_rows(rows, Namespace(**{**vars(args), "eval_samples": 0})) == (rows, [])
    toy_args = Namespace(eval_samples=50, eval_dataset=None, dataset="toy", eval_split="test", turn="first", seed=1,
                         dataset_revision=None, dataset_config=None)
    train, held = evaluation.heldout_rows(rows, toy_args)
    assert train is rows and len(held) == 50
    assert {r["messages"][0]["content"] for r in held} <= {r["messages"][0]["content"] for r in data.toy_rows("test")}


@pytest.mark.slow  # needs lm_eval (requirements-eval.txt)
def test_lm_eval_runs_offline_on_a_local_task_and_scores_what_the_model_answers(small_sft_model, tmp_path):
    """A task made here over a local data file: half its targets are the model's own greedy answers
    (from generate.py), half are not, so the real harness must report exactly 0.5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_sft_model)
    model = AutoModelForCausalLM.from_pretrained(small_sft_model).eval()
    questions = [r["messages"][0]["content"] for r in data.toy_rows("test")[:40]]
    prompts = [data.ChatFormat(tokenizer).prompt_ids([{"role": "user", "content": q}]) for q in questions]
    answers = [a["text"] for a in generate.generate(model, tokenizer, prompts, generate.Sampling(max_new_tokens=16, do_sample=False, batch_size=40))]
    docs = [{"question": q, "answer": a if i % 2 == 0 else a + "!"} for i, (q, a) in enumerate(zip(questions, answers))]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks" / "echo.yaml").write_text((ROOT / "evals" / "toy_sum" / "toy_sum.yaml").read_text()
        .replace("task: toy_sum", "task: spin_test_echo")
        .replace("custom_dataset: !function utils.load", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                 f"    test: {tmp_path / 'tasks' / 'docs.jsonl'}"))
    args = eval_args(tokenizer.pad_token_id, eval_tasks=["spin_test_echo"], eval_limit=None,
                     eval_include_path=str(tmp_path / "tasks"), generation_batch_size=16)
    scores = evaluation.lm_eval_scores(model, tokenizer, args, tmp_path / "lm_eval.json")
    version = importlib.metadata.version("lm_eval")
    assert scores == {"spin_test_echo/exact_match": 0.5, "lm_eval_version": version}
    saved = json.loads((tmp_path / "lm_eval.json").read_text())
    assert saved["results"]["spin_test_echo"]["sample_len"] == 40
    assert saved["harness"]["lm_eval"] == version and saved["harness"]["limit"] is None


# --- A local Hugging Face cache of the paper's data sets, a few rows each --------------------------
# The hub's layout (HF_HOME/hub/datasets--ORG--NAME/refs/main -> snapshots/<commit>/), each data set
# in its own file layout (one folder of parquet files per configuration, <split>-00000-of-00001;
# `data/` for a single default configuration) and schema, with the README `configs` block that
# tells `datasets` which files are which configuration. Few-shot splits hold the paper's shots + 1
# rows (lm-eval's random sampler draws one more than the shots); MMLU's dev split its 5; test splits
# 2 rows, of which --eval_limit 1 takes one. All 57 MMLU subjects are written (1 dev-sized block
# each), so MMLU runs as the harness defines it, not a reduced set.

COMMIT = "5" * 40  # the snapshot every refs/main points to


def choice_rows(n: int, offset: int, make) -> list[dict]:
    """n rows of a multiple-choice question about a sum; the right answer moves with i."""
    return [make(i + offset, (i + offset) % 4) for i in range(n)]


def mc(a: int, right: int) -> tuple[str, list[str]]:
    """A sum's question and four answers, the true one at `right`."""
    answers = [str(a + 1 + k) for k in range(1, 4)]
    answers.insert(right, str(a + 1))
    return f"{a}+1", answers


def arc(a, right):
    q, answers = mc(a, right)
    return {"id": f"Toy_{a}", "question": q, "answerKey": "ABCD"[right],
            "choices": {"text": answers, "label": list("ABCD")}}


def hellaswag(a, right, split="train"):
    q, answers = mc(a, right)
    return {"ind": a, "activity_label": "Sums", "ctx_a": q, "ctx_b": "is", "ctx": f"{q} is",
            "endings": answers, "source_id": f"toy~{a}", "split": split, "split_type": "indomain",
            "label": str(right)}


def truthfulqa(a, right):
    q, answers = mc(a, right)
    targets = {"choices": answers, "labels": [int(k == right) for k in range(4)]}
    return {"question": f"What is {q}?", "mc1_targets": targets, "mc2_targets": targets}


def mmlu(subject):
    def row(a, right):
        q, answers = mc(a, right)
        return {"question": q, "subject": subject, "choices": answers, "answer": right}
    return row


def winogrande(a, right):
    options = [str(a + 1), str(a + 2)]
    return {"sentence": f"{a}+1 is _", "option1": options[right % 2],
            "option2": options[1 - right % 2], "answer": str(right % 2 + 1)}


def gsm8k(a, right):
    return {"question": f"What is {a}+{a}?", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"}


def bbh(a, right):
    return {"input": f"Is {a}+1 equal to {a + right}?\nOptions:\n- Yes\n- No",
            "target": "Yes" if right == 1 else "No"}


def openbookqa(a, right):
    q, answers = mc(a, right)
    return {"id": f"{a}-1", "question_stem": f"{q} is", "answerKey": "ABCD"[right],
            "choices": {"text": answers, "label": list("ABCD")}}


def mmlu_subjects() -> list[str]:
    """The 57 subjects, read off the installed harness's own MMLU task files."""
    import lm_eval
    import yaml

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    return sorted(yaml.safe_load(f.read_text())["dataset_name"] for f in folder.glob("mmlu_*.yaml"))


def paper_data() -> dict:
    """{hub data set: {configuration: {split: rows}}} for every task of evals/paper.py."""
    shots = {s.task: s.shots for s in paper.SETTINGS}
    test = 2
    return {
        "allenai/ai2_arc": {"ARC-Challenge": {
            "train": choice_rows(shots["arc_challenge"] + 1, 0, arc),
            "validation": choice_rows(1, 40, arc), "test": choice_rows(test, 60, arc)}},
        "Rowan/hellaswag": {"default": {
            "train": choice_rows(shots["hellaswag"] + 1, 0, hellaswag),
            "validation": choice_rows(test, 60, lambda a, r: hellaswag(a, r, "val")),
            "test": [{**hellaswag(90, 0, "test"), "label": ""}]}},  # the hub's test has no labels
        "truthfulqa/truthful_qa": {"multiple_choice": {
            "validation": choice_rows(test, 60, truthfulqa)}},
        "cais/mmlu": {s: {"dev": choice_rows(shots["mmlu"], 0, mmlu(s)),
                          "test": choice_rows(test, 60 + i, mmlu(s))}
                      for i, s in enumerate(mmlu_subjects())},
        "allenai/winogrande": {"winogrande_xl": {
            "train": choice_rows(shots["winogrande"] + 1, 0, winogrande),
            "validation": choice_rows(test, 60, winogrande)}},
        "openai/gsm8k": {"main": {"train": choice_rows(shots["gsm8k"] + 1, 0, gsm8k),
                                  "test": choice_rows(test, 60, gsm8k)}},
        "SaylorTwift/bbh": {name: {"test": choice_rows(test, 60, bbh)}  # shots: in the task file
                            for name in ("causal_judgement", "sports_understanding",
                                         "formal_fallacies")},
        "allenai/openbookqa": {"main": {"train": choice_rows(2, 0, openbookqa),
                                        "validation": choice_rows(1, 40, openbookqa),
                                        "test": choice_rows(test, 60, openbookqa)}},
    }


def write_hub_cache(home: Path) -> None:
    """paper_data() as the hub's cache holds it under HF_HOME=home."""
    import pandas as pd

    for repo, configs in paper_data().items():
        root = home / "hub" / f"datasets--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / COMMIT
        card = ["---", "configs:"]
        for config, splits in configs.items():
            folder = "data" if config == "default" else config
            card += [f"- config_name: {config}", "  data_files:"]
            for split, rows in splits.items():
                (snapshot / folder).mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_parquet(snapshot / folder / f"{split}-00000-of-00001.parquet")
                card += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
        (snapshot / "README.md").write_text("\n".join([*card, "---", ""]))
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="session")
def paper_hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    write_hub_cache(home)
    return home


@contextlib.contextmanager
def offline_hub(home: Path):
    """HF_HOME=home for this block, in the modules that read it at import (huggingface_hub's cache
    path; datasets' own cache, so nothing is written under ~/.cache); HF_HUB_OFFLINE=1 is
    conftest's."""
    import datasets
    import huggingface_hub.constants

    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        yield


@pytest.fixture(scope="session")
def long_toy(small_sft_model, tmp_path_factory):
    """The toy SFT model with room for the paper's prompts: 2048 positions (rotary: any position
    is computed; lm-eval refuses to generate 256 tokens in the toy's 128), and replies capped at 16
    new tokens by its generation_config, which transformers lets win over lm-eval's max_length:
    the toy never learned chain of thought and would write BBH's 1024 tokens of digits."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("long_toy") / "model"
    shutil.copytree(small_sft_model, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    generation = GenerationConfig.from_pretrained(path)
    generation.max_new_tokens = 16
    generation.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(long_toy, paper_hub, tmp_path_factory):
    """Two iterations of the toy; lm-eval's tasks, the paper's included, on the last model only.
    Returns the run directory and what it printed."""
    out = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with offline_hub(paper_hub), contextlib.redirect_stdout(printed):
        assert spin.cli(toy_run(long_toy, out, "--iters", 2, "--eval_samples", 40,
                                "--report_to", "tensorboard", "--eval_tasks", "toy_sum,paper",
                                "--eval_models", "last", "--eval_limit", 1, *SMALL)) == 0
    printed_by(out).write_text(printed.getvalue())
    return out


def printed_by(run: Path) -> Path:
    """Where the run fixture keeps what spin.py printed (beside the run directory)."""
    return run.with_name(run.name + "-printed.txt")


@pytest.mark.slow  # runs spin.py end to end (the run fixture)
def test_every_model_has_a_row_of_heldout_numbers(run):
    rows = read_jsonl(run / "evaluation.jsonl")
    assert [(r["model"], r["path"]) for r in rows] == [(0, "start"), (1, "iter0/model"), (2, "iter1/model")]
    assert all(r["eval_prompts"] == 40 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert "eval_loss" not in rows[0] and all("eval_loss" in r for r in rows[1:])
    # --eval_models last: lm-eval ran on θ_2 alone
    assert [any("/" in k for k in r) for r in rows] == [False, False, True]
    assert sorted(p.name for p in (run / "eval").glob("lm_eval_*")) == ["lm_eval_model2.json"]
    saved = json.loads((run / "eval" / "lm_eval_model2.json").read_text())["results"]["toy_sum"]
    assert saved["sample_len"] == 1 and rows[2]["toy_sum/exact_match"] == saved["exact_match,none"]
    for s in (1, 2):  # the rows are what the saved samples give
        samples, previous = read_jsonl(run / "eval" / f"model{s}.jsonl"), read_jsonl(run / "eval" / f"model{s - 1}.jsonl")
        for key, value in evaluation.metrics(samples, previous, 1.0, "logistic").items():
            assert rows[s][key] == pytest.approx(value)
    iterations = read_jsonl(run / "iterations.jsonl")
    assert [r["eval_loss"] for r in iterations] == [r["eval_loss"] for r in rows[1:]]


def snapshot(paper_hub: Path, setting) -> str:
    """The cached snapshot directory of a setting's data set."""
    repo = setting.dataset.split()[0].replace("/", "--")
    return str(paper_hub / "hub" / f"datasets--{repo}" / "snapshots" / COMMIT)


@pytest.mark.slow  # runs spin.py end to end (the run fixture)
def test_the_papers_evaluation_of_the_last_model_has_the_papers_shots_metrics_and_mean(
        run, paper_hub):
    saved = json.loads((run / "eval" / "lm_eval_model2.json").read_text())
    row = read_jsonl(run / "evaluation.jsonl")[2]
    groups, results = saved["group_subtasks"], saved["results"]
    subjects = [t for t in paper.under(groups, "mmlu") if t not in groups]
    assert len(subjects) == 57
    for s in paper.SETTINGS:  # every task ran on one question, with the shots of its setting,
        for task in subjects if s.task == "mmlu" else [s.task]:  # on the cache's copy of its data
            assert saved["n-shot"][task] == s.shots, task
            assert saved["n-samples"][task]["effective"] == 1, task
            assert saved["configs"][task]["dataset_path"] == snapshot(paper_hub, s), task
    # each column is its setting's metric; MMLU the plain mean of its subjects; the average that
    # of the six leaderboard columns
    expected = {f"paper/{s.column}": results[s.task][s.metric] for s in paper.SETTINGS
                if s.task != "mmlu"}
    expected["paper/MMLU"] = sum(results[t]["acc,none"] for t in subjects) / len(subjects)
    expected["paper/Average"] = sum(expected[f"paper/{s.column}"] for s in paper.LEADERBOARD) / 6
    assert {k: v for k, v in row.items() if k.startswith("paper/")} == pytest.approx(expected)
    assert 0 < expected["paper/MMLU"] < 1  # the subjects' scores differ: a mean, not a copy
    # the harness version with the results, in the model card and in the printed table
    version = importlib.metadata.version("lm_eval")
    assert saved["harness"]["lm_eval"] == row["lm_eval_version"] == version
    assert saved["harness"]["apply_chat_template"] is False
    card = (run / "iter1" / "model" / "README.md").read_text()
    printed = printed_by(run).read_text()
    for text in (card, printed):
        assert paper.harness_line(version) in text
        assert "| model | ARC | HellaSwag | TruthfulQA | MMLU | Winogrande | GSM8k | Average |" in text
        assert ("| paper: SPIN iteration 3 (Table 2) | 65.87 | 85.54 | 54.90 | 59.99 | 73.72 | "
                "38.97 | 63.16 |") in text
        assert ("| model | BBH causal judgement | BBH sports understanding | BBH formal fallacies | "
                "OpenBookQA |") in text
    assert "| θ_2 (this model) |" in card and "| θ_2 (iter1/model) |" in printed
    assert "note: the model's generation_config sets max_new_tokens=16" in printed


@pytest.mark.slow  # the run fixture, and a second evaluation of its last model
def test_the_standalone_command_evaluates_a_model_directory_the_same_way(run, paper_hub, tmp_path,
                                                                         capsys):
    model = run / "iter1" / "model"
    with offline_hub(paper_hub):
        assert paper.main(["--model", str(model), "--limit", "1", "--batch_size", "200",
                           "--output", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    got = json.loads((tmp_path / "out.json").read_text())
    ran = json.loads((run / "eval" / "lm_eval_model2.json").read_text())
    assert got["n-shot"] == {k: v for k, v in ran["n-shot"].items() if k != "toy_sum"}
    # the same model, questions, shots and batches as the run's evaluation of θ_2: the same scores
    # (approx: two runs of one computation, equal up to float rounding)
    assert paper.scores(got) == pytest.approx(paper.scores(ran), abs=1e-6)
    assert got["model"] == {"name": str(model), "revision": None}
    version = importlib.metadata.version("lm_eval")
    assert paper.harness_line(version) in printed and f"| {model} |" in printed
    assert f"results: {tmp_path / 'out.json'}" in printed


@pytest.mark.slow  # the run fixture loads the tasks
def test_a_task_with_fewer_examples_than_its_shots_is_named(run, paper_hub):
    tasks = {t.task_name: t for t in evaluation.paper_group(None).get_all_tasks()}
    assert len(tasks) == 57 + len(paper.SETTINGS) - 1 and paper.short_of_shots(tasks) == []
    arc = tasks["arc_challenge"]
    arc.set_config(key="num_fewshot", value=26)  # the cache holds 25 + 1
    try:
        assert paper.short_of_shots(tasks) == [
            f"arc_challenge runs 26-shot and needs 27 few-shot examples, its data "
            f"({snapshot(paper_hub, paper.SETTINGS[0])}) has 26"]
    finally:
        arc.set_config(key="num_fewshot", value=25)


def test_the_papers_columns_are_its_metrics_mmlu_the_mean_of_its_subjects():
    """paper.scores on lm-eval's result layout: MMLU is the plain mean over subjects (lm-eval's own
    group number weights them by size, 0.9 here), the average the plain mean of the six."""
    metric = {s.task: (s.metric, 0.1 * i) for i, s in enumerate(paper.SETTINGS)}
    results = {"results": {task: {m: v, f"{m.split(',')[0]}_stderr,none": 0.5}
                           for task, (m, v) in metric.items()},
               "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_law"],
                                  "mmlu_stem": ["mmlu_algebra", "mmlu_physics"]}}
    results["results"].update(mmlu={"acc,none": 0.9}, mmlu_stem={"acc,none": 0.2},
                              mmlu_algebra={"acc,none": 0.0}, mmlu_physics={"acc,none": 0.25},
                              mmlu_law={"acc,none": 1.0})
    scores = paper.scores(results)
    assert scores["paper/MMLU"] == pytest.approx((0.0 + 0.25 + 1.0) / 3)
    assert (scores["paper/ARC"], scores["paper/GSM8k"], scores["paper/OpenBookQA"]) == \
        pytest.approx((0.0, 0.5, 0.9))
    assert scores["paper/Average"] == pytest.approx((0.0 + 0.1 + 0.2 + 1.25 / 3 + 0.4 + 0.5) / 6)
    assert set(scores) == {f"paper/{s.column}" for s in paper.SETTINGS} | {"paper/Average"}


def test_eval_models_names_the_models_lm_eval_runs_on(tmp_path, capsys):
    def chosen(*names, iters=3):
        return [s for s in range(iters + 1)
                if evaluation.evaluated(s, Namespace(eval_models=list(names), iters=iters))]
    assert chosen("all") == [0, 1, 2, 3] and chosen("last") == [3] and chosen("start", "2") == [0, 2]
    out = tmp_path / "run"
    assert spin.cli(["--iters", "2", "--eval_models", "3", "--output_dir", str(out)]) == 2
    assert "--eval_models 3: all, start, last or model numbers 0..2" in capsys.readouterr().err
    assert not out.exists()


def test_the_docs_show_the_settings_table_of_the_code():
    assert paper.settings_table() in (ROOT / "docs" / "evaluation.md").read_text()


@pytest.mark.slow  # runs spin.py end to end (the run fixture)
def test_the_plot_gets_every_step_and_every_model(run):
    steps = read_jsonl(run / "iter0" / "metrics.jsonl") + read_jsonl(run / "iter1" / "metrics.jsonl")
    rows = read_jsonl(run / "evaluation.jsonl")
    panels = plot.panels(run)
    assert list(panels) == ["SPIN loss (training)", "rewards λ·log p_θ/p_θt (training)", "margin (training)",
                            "held-out SPIN (θ_s against θ_s−1)", "held-out log p(y|x) per token", "task metrics"]
    assert panels["SPIN loss (training)"]["series"]["loss"] == (list(range(len(steps))), [m["loss"] for m in steps])
    assert panels["SPIN loss (training)"]["starts"] == [0, 7]
    assert panels["rewards λ·log p_θ/p_θt (training)"]["series"]["generated_reward"][1] == \
        [m["generated_reward"] for m in steps]
    assert panels["margin (training)"]["series"]["margin"][1] == [m["margin"] for m in steps]
    assert panels["held-out SPIN (θ_s against θ_s−1)"]["series"]["eval_loss"] == ([1, 2], [r["eval_loss"] for r in rows[1:]])
    assert panels["task metrics"]["series"]["tv_distance"] == ([0, 1, 2], [r["tv_distance"] for r in rows])
    png = (run / "spin.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1500, 720)  # 3 × 2 panels at 100 dpi
    (run / "spin.png").unlink()
    assert spin.cli(["--plot", str(run)]) == 0 and (run / "spin.png").read_bytes()[:8] == png[:8]


def test_plot_of_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert spin.cli(["--plot", str(tmp_path)]) == 2
    assert "not a SPIN run directory" in capsys.readouterr().err
    assert not (tmp_path / "spin.png").exists()


@pytest.mark.slow  # runs spin.py end to end (the run fixture)
def test_tensorboard_event_files_hold_every_step_and_every_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = read_jsonl(run / "iter0" / "metrics.jsonl") + read_jsonl(run / "iter1" / "metrics.jsonl")
    rows = read_jsonl(run / "evaluation.jsonl")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, len(steps) + 1))  # optimizer steps done
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in steps], rel=1e-6)  # stored as float32
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx([m["learning_rate"] for m in steps])
    for ours, theirs in (("margin", "rewards/margins"), ("real_reward", "rewards/real"),
                         ("generated_reward", "rewards/generated"), ("reward_accuracy", "rewards/accuracies")):
        assert [e.value for e in events.Scalars(theirs)] == pytest.approx([m[ours] for m in steps], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == \
        [(7, pytest.approx(rows[1]["eval_loss"], rel=1e-6)), (len(steps), pytest.approx(rows[2]["eval_loss"], rel=1e-6))]
    assert [e.step for e in events.Scalars("eval/tv_distance")] == [0, 7, len(steps)]


def test_a_model_card_names_the_model_it_was_trained_from_when_the_hub_can():
    """Iteration 0 of the recipe: base_model is the SFT model θ_0; a later iteration's θ_t is a local
    directory (iter{t-1}/model), which Hub metadata cannot name, so its card says it in the text."""
    config = {"model": "alignment-handbook/zephyr-7b-sft-full", "dataset": "HuggingFaceH4/ultrachat_200k", "iters": 4,
              "beta": 0.1, "loss_type": "logistic", "num_train_epochs": 2, "per_device_train_batch_size": 8,
              "gradient_accumulation_steps": 1, "world_size": 8, "max_length": 1024, "max_prompt_length": 512,
              "max_new_tokens": 256, "seed": 42}
    row = {"pairs": 50000, "learning_rate": 5e-7, "loss": 0.5, "first_loss": 0.6931, "margin": 1.0, "reward_accuracy": 0.9}
    first, later = (ModelCard(report.model_card(config, {**row, "iteration": t}, {"iteration": "start"})) for t in (0, 1))
    assert first.data.base_model == "alignment-handbook/zephyr-7b-sft-full"
    assert first.data.datasets == later.data.datasets == ["HuggingFaceH4/ultrachat_200k"]
    assert later.data.base_model is None and "The opponent of this iteration was iter0/model" in later.text


@pytest.mark.slow  # runs spin.py end to end (the run fixture)
def test_each_model_directory_has_a_model_card_saying_how_it_was_made(run):
    row = read_jsonl(run / "iterations.jsonl")[1]
    card = (run / "iter1" / "model" / "README.md").read_text()
    data = ModelCard(card).data  # huggingface_hub's reading of the metadata block
    assert data.tags == ["spin", "self-play-fine-tuning"] and data.library_name == "transformers"
    assert data.base_model is None and data.datasets is None  # a local start and the toy: nothing the Hub can name
    assert "# SPIN iteration 1: θ_2" in card and "The opponent of this iteration was iter0/model" in card
    for line in ["| training pairs | 400 |", "| λ (--beta) | 1.0 |", "| learning rate | 0.0001 |", "| epochs | 1 |",
                 f"| eval_loss |  | {row['eval_loss']:.4f} |", "| tv_distance | ", f"{row['tv_distance']:.4f} |"]:
        assert line in card
    config = json.loads(card.split("```json\n")[1].split("```")[0])
    assert config == json.loads((run / "config.json").read_text())


def wandb_history(run_file: Path) -> list[dict]:
    """The logged rows of a wandb run file (what `wandb sync` uploads): a LevelDB-style log of 32 KiB
    blocks after a 7-byte header, each record a (crc, length, type) header and a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, records, part = run_file.read_bytes(), 7, [], b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero-filled tail of a block
            pos += left
            continue
        part, pos = part + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                records.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return records


@pytest.mark.slow  # runs spin.py end to end; needs the trackers (requirements-eval.txt)
def test_a_continued_run_extends_every_trackers_steps_without_repeating_any(small_sft_model, tmp_path, monkeypatch):
    """TensorBoard, wandb (offline: its run file) and trackio (its local database) get the same numbers
    on the same step axis, and a continued run extends the same wandb and trackio runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setenv("WANDB_PROJECT", "spin-tests")
    monkeypatch.setenv("TRACKIO_PROJECT", project := f"spin-tests-{tmp_path.name}")
    argv = toy_run(small_sft_model, tmp_path, "--eval_samples", 10, "--report_to", "tensorboard", "wandb", "trackio", *SMALL)
    assert spin.cli(argv + ["--iters", "1"]) == 0
    assert spin.cli(argv + ["--iters", "2"]) == 0  # resumes: iteration 0 is complete, iteration 1 runs
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = read_jsonl(tmp_path / "iter0" / "metrics.jsonl") + read_jsonl(tmp_path / "iter1" / "metrics.jsonl")
    losses = [m["loss"] for m in steps]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, len(steps) + 1))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/real_logp")] == [0, 7, len(steps)]
    assert [e.value for e in events.Scalars("rewards/margins")] == pytest.approx([m["margin"] for m in steps], rel=1e-6)

    run_id = (tmp_path / "tracker_id").read_text()
    [first, second] = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))  # one run, twice
    wandb_rows = wandb_history(first) + wandb_history(second)
    train = [r for r in wandb_rows if "train/loss" in r]
    assert [r["global_step"] for r in train] == list(range(1, len(steps) + 1))
    assert [r["train/loss"] for r in train] == pytest.approx(losses, rel=1e-6)
    assert [r["global_step"] for r in wandb_rows if "eval/real_logp" in r] == [0, 7, len(steps)]

    trackio_rows = SQLiteStorage.get_logs(project, f"{tmp_path.name}-{run_id}")
    train = [r for r in trackio_rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, len(steps) + 1))
    assert [r["train/loss"] for r in train] == pytest.approx(losses, rel=1e-6)
    assert [r["rewards/accuracies"] for r in train] == pytest.approx([m["reward_accuracy"] for m in steps], rel=1e-6)
    assert [r["step"] for r in trackio_rows if "eval/real_logp" in r] == [0, 7, len(steps)]
