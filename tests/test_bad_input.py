"""Bad input: one line naming the row or flag, exit status 2, and no run directory left behind."""
import json
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import gguf
import numpy
import pytest

import spin

ROOT = Path(__file__).resolve().parents[1]
# TRL (requirements-test.txt) ships real chat templates; found, not imported, so that the classroom
# subset (-m "not slow") runs with requirements.txt alone and skips the one case that needs it
TRL_TEMPLATES = Path(spec.origin).parent / "chat_templates" if (spec := find_spec("trl")) else None
GOOD = {"prompt": "1+2", "response": "3"}
BAD_ROWS = {  # row 1 of a two-row .jsonl file (row 0 is GOOD)
    "missing column": ({"question": "q", "answer": "a"}, "row 1: no 'messages', 'real' or 'prompt'+'response' column"),
    "mistyped column": ({"messages": "1+2 is 3"}, "row 1: messages must be a list"),
    "empty response": ({"prompt": "q", "response": ""}, "row 1: the human response is empty"),
    "whitespace response": ({"prompt": "q", "response": " \n\t"}, "row 1: the human response is empty"),
    "non-string content": ({"prompt": ["q"], "response": "a"}, "row 1: user content is not a string"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
                        "row 1: roles must alternate"),
    "two user turns": ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a"}]}, "row 1: roles must alternate"),
    "unknown role": ({"messages": [{"role": "bot", "content": "a"}]}, "row 1: unknown role 'bot'"),
    "no assistant reply": ({"messages": [{"role": "user", "content": "q"}]}, "row 1: no assistant message"),
    "official schema, bad real": ({"real": [{"role": "user", "content": "q"}], "generated": []},
                                  "row 1: no assistant message"),
}


def write_rows(path, second):
    path.write_text(json.dumps(GOOD) + "\n" + (second if isinstance(second, str) else json.dumps(second)) + "\n")
    return str(path)


@pytest.fixture
def files(tmp_path, small_sft_model):
    """Broken files and model directories, made on the spot."""
    no_weights = tmp_path / "no-weights"
    shutil.copytree(small_sft_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    no_template = tmp_path / "no-template"
    shutil.copytree(small_sft_model, no_template)
    (no_template / "chat_template.jinja").unlink()
    gemma = tmp_path / "gemma-template"  # Gemma's real template (TRL ships it) raises on a system turn
    shutil.copytree(small_sft_model, gemma)
    if TRL_TEMPLATES:
        (gemma / "chat_template.jinja").write_text((TRL_TEMPLATES / "gemma.jinja").read_text())
    no_header = tmp_path / "no-header"  # a template that ignores add_generation_prompt
    shutil.copytree(small_sft_model, no_header)
    (no_header / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "typo.yaml").write_text("beta: 0.1\nlerning_rate: 1e-6\n")
    (tmp_path / "list.yaml").write_text("- beta\n- 0.1\n")
    (tmp_path / "bad-value.yaml").write_text("loss_type: ipo\n")
    ours = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
    (tmp_path / "fp16.json").write_text(json.dumps({**ours, "bf16": {"enabled": False}, "fp16": {"enabled": True}}))
    (tmp_path / "bf16.json").write_text(json.dumps({**ours, "bf16": {"enabled": True}}))
    (tmp_path / "garbage.gguf").write_bytes(b"not a GGUF file")
    unsupported = gguf.GGUFWriter(str(tmp_path / "unsupported.gguf"), arch="xyzzy")  # a real GGUF file
    unsupported.add_block_count(1)
    unsupported.add_tensor("token_embd.weight", numpy.zeros((4, 8), dtype=numpy.float32))
    unsupported.write_header_to_file()
    unsupported.write_kv_data_to_file()
    unsupported.write_tensors_to_file()
    unsupported.close()
    (tmp_path / "data.csv").write_text("prompt,response\nq,a\n")
    (tmp_path / "object.json").write_text(json.dumps(GOOD))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "notes.txt").write_text("mine")
    return {"no_weights": str(no_weights), "no_template": str(no_template), "dir": tmp_path, "gemma": str(gemma),
            "no_header": str(no_header),
            "torn": write_rows(tmp_path / "torn.jsonl", '{"prompt": "q", "resp')}


FLAG_CASES = {  # name: (flags, what the message must contain)
    "--iters 0": (["--iters", "0"], "--iters must be at least 1"),
    "--iters abc": (["--iters", "abc"], "argument --iters: invalid int value"),
    "--beta 0": (["--beta", "0"], "--beta (λ) must be positive"),
    "--beta -1": (["--beta", "-1"], "--beta (λ) must be positive"),
    "--learning_rate -1": (["--learning_rate", "1e-5", "-1"], "--learning_rate values must be positive"),
    "no room for a response": (["--max_length", "32", "--max_prompt_length", "32"],
                               "--max_length must exceed --max_prompt_length"),
    "--warmup_ratio 1": (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1)"),
    "--temperature 0": (["--temperature", "0"], "use --greedy"),
    "--top_p 1.5": (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    "--max_samples 0": (["--max_samples", "0"], "--max_samples must be at least 1"),
    "unknown flag": (["--learning-rate", "1e-5"], "unrecognized arguments: --learning-rate"),
    "unknown loss": (["--loss_type", "ipo"], "argument --loss_type: invalid choice"),
    "--config with an unknown key": (["--config", "{dir}/typo.yaml"], "--config {dir}/typo.yaml: unknown key 'lerning_rate'"),
    "--config that is not a mapping": (["--config", "{dir}/list.yaml"], "expected a mapping of flag names to values"),
    "--config with a bad value": (["--config", "{dir}/bad-value.yaml"], "loss_type must be one of logistic, sigmoid, hinge"),
    "missing --config": (["--config", "{dir}/nope.yaml"], "--config {dir}/nope.yaml: cannot be read"),
    "model without dataset": (["--model", "{no_weights}", "--dataset", None], "--dataset is required with --model"),
    "model without weights": (["--model", "{no_weights}"], "is not a model directory with safetensors weights"),
    "tokenizer without chat template": (["--model", "{no_template}"], "its tokenizer has no chat template"),
    "unreachable hub model": (["--model", "nobody-here/no-model"], "--model nobody-here/no-model could not be loaded "
                                                                    "from the Hugging Face Hub"),
    "unreachable hub data set": (["--dataset", "nobody-here/no-data"], "--dataset nobody-here/no-data: not a local "
                                                                        "file and could not be loaded"),
    "empty data set": (["--dataset", "{dir}/empty.jsonl"], "the data set has no rows"),
    "unsupported file type": (["--dataset", "{dir}/data.csv"], "unsupported file type"),
    "json that is not a list": (["--dataset", "{dir}/object.json"], "expected a JSON list of rows"),
    "torn jsonl line": (["--dataset", "{torn}"], "line 2 is not valid JSON"),
    "flash attention on a CPU": (["--attn_implementation", "flash_attention_2", "--bf16"],
                                 "flash_attention_2 needs a CUDA GPU"),
    "flash attention in float32": (["--attn_implementation", "flash_attention_2"], "flash_attention_2 needs --bf16"),
    "--deterministic with top-p sampling": (["--deterministic", "--top_p", "0.9"],
                                            "--deterministic with --top_p 0.9: top-p sampling runs torch.cumsum"),
    "deepspeed config in fp16": (["--deepspeed", "{dir}/fp16.json", "--bf16"], "fp16 is enabled; SPIN trains in bf16"),
    "deepspeed config in bf16 without --bf16": (["--deepspeed", "{dir}/bf16.json"],
                                                "sets bf16 enabled=true but --bf16 is off: pass --bf16"),
    "unknown attention": (["--attn_implementation", "fast"], "--attn_implementation must be eager, sdpa or"),
    "missing deepspeed config": (["--deepspeed", "{dir}/nope.json"], "--deepspeed {dir}/nope.json: no such file"),
    "global batch that does not divide": (["--global_batch_size", "10", "--per_device_train_batch_size", "4"],
                                          "--global_batch_size 10 is not --per_device_train_batch_size 4"),
    "--eval_samples -1": (["--eval_samples", "-1"], "--eval_samples must be 0 (no held-out evaluation) or more"),
    "--eval_limit 0": (["--eval_limit", "0"], "--eval_limit must be at least 1"),
    "unknown lm-eval task": (["--eval_tasks", "toy_sum,no_such_task"], "--eval_tasks: unknown lm-eval task 'no_such_task'"),
    "missing lm-eval task directory": (["--eval_include_path", "{dir}/nope"], "--eval_include_path {dir}/nope: no such"),
    "unknown --report_to": (["--report_to", "tensorboard", "mlflow"], "argument --report_to: invalid choice: 'mlflow'"),
    "--push_to_hub offline": (["--push_to_hub", "--hub_model_id", "me/spin-toy"],
                              "--push_to_hub: the Hub is unreachable or offline mode is on (HF_HUB_OFFLINE=1)"),
    "unreachable eval data set": (["--eval_dataset", "nobody-here/no-data"], "--eval_dataset nobody-here/no-data: not a "
                                                                             "local file and could not be loaded"),
    "bad eval row": (["--eval_dataset", "{torn}"], "line 2 is not valid JSON"),
    "system turn the template rejects": (["--model", "{gemma}", "--system_prompt", "Be brief."],
                                         "--system_prompt 'Be brief.': the chat template of --model"),
    "--chat_template_kwargs not JSON": (["--chat_template_kwargs", "enable_thinking=false"],
                                        "argument --chat_template_kwargs: not valid JSON"),
    "--chat_template_kwargs a list": (["--chat_template_kwargs", "[1, 2]"],
                                      "argument --chat_template_kwargs: must be a JSON object"),
    "template without generation header": (["--model", "{no_header}"], "its chat template writes nothing for "
                                                                       "add_generation_prompt=True"),
    "not a GGUF file": (["--model", "{dir}/garbage.gguf"], "does not start with the GGUF magic bytes"),
    "GGUF of an unsupported architecture": (["--model", "{dir}/unsupported.gguf"],
                                            "transformers cannot load this GGUF file (GGUF model with architecture xyzzy"),
    "--gguf_file not in the directory": (["--model", "{dir}", "--gguf_file", "nope.gguf"], "--model {dir}/nope.gguf: no such file"),
    "output_dir that is not a run": (["--output_dir", "{dir}/not-a-run"], "is a non-empty directory that is not a SPIN run"),
}
# cases that need a package outside requirements.txt; lm-eval's is slow: it indexes its tasks
NEEDS = {"system turn the template rejects": "trl", "unknown lm-eval task": "lm_eval"}
FLAG_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if NEEDS.get(c) == "lm_eval" else c
               for c in FLAG_CASES]


def resolve(flags, files, small_sft_model, run):
    out = []
    for flag in flags:
        out.append(None if flag is None else flag.format(**files))
    defaults = {"--model": str(small_sft_model), "--dataset": "toy", "--output_dir": str(run), "--quiet": None}
    for key, value in defaults.items():
        if key not in out:
            out += [key] + ([value] if value is not None else [])
    while None in out:  # a flag given as None is left out on purpose
        del out[out.index(None) - 1: out.index(None) + 1]
    return out


def check(code, err, message, run):
    message = message.format(dir=run.parent) if "{dir}" in message else message
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err
    assert not run.exists()  # nothing written that could look like a run


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows(tmp_path, small_sft_model, capsys, case):
    record, message = BAD_ROWS[case]
    run = tmp_path / "run"
    argv = ["--model", str(small_sft_model), "--dataset", write_rows(tmp_path / "data.jsonl", record),
            "--output_dir", str(run), "--quiet"]
    code = spin.cli(argv)
    check(code, capsys.readouterr().err, message, run)


@pytest.mark.parametrize("case", FLAG_PARAMS)
def test_bad_flags_models_and_files(tmp_path, small_sft_model, files, capsys, case):
    flags, message = FLAG_CASES[case]
    if case in NEEDS and find_spec(NEEDS[case]) is None:
        pytest.skip(f"needs {NEEDS[case]} (requirements-test.txt)")
    run = tmp_path / "run"
    argv = resolve(flags, files, small_sft_model, run)
    try:
        code = spin.cli(argv)
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    check(code, capsys.readouterr().err, message, run)
    if case == "output_dir that is not a run":
        assert [p.name for p in (files["dir"] / "not-a-run").iterdir()] == ["notes.txt"]


@pytest.mark.slow  # starts a process
def test_the_process_exit_status_is_2(tmp_path, small_sft_model):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "spin.py"), "--model", str(small_sft_model), "--dataset",
                             write_rows(tmp_path / "d.jsonl", {"prompt": "q", "response": ""}), "--output_dir", str(run)],
                            capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    check(result.returncode, result.stderr, "row 1: the human response is empty", run)


@pytest.mark.slow  # runs spin.py end to end
def test_long_prompts_are_cut_and_counted_not_silently(tmp_path, small_sft_model, capsys):
    path = tmp_path / "long.jsonl"
    lengths = [(2, 40), (40, 1), (3, 1), (50, 20)]  # prompt and response characters (= tokens of the toy)
    path.write_text("\n".join(json.dumps({"prompt": "7" * p, "response": "8" * r}) for p, r in lengths) + "\n")
    code = spin.cli(["--model", str(small_sft_model), "--dataset", str(path), "--output_dir", str(tmp_path / "run"),
                     "--iters", "1", "--max_prompt_length", "30", "--max_length", "40", "--max_new_tokens", "4",
                     "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--quiet"])
    assert code == 0
    assert "4 prompts from" in (out := capsys.readouterr().out)
    assert "2 prompts longer than --max_prompt_length 30 were cut from the left" in out
    # rows 0 and 3: 8 + 41 and 30 (cut) + 21 tokens exceed 40
    assert "2 human responses will be cut to fit --max_length 40 (trained without their end-of-turn)" in out
