"""The flags, walked from the parser: every flag has help, --help shows the value a run without the
flag takes, --print_config names every setting with where it came from, and every flag with a
default can be set by a recipe and by a config file (one precedence for all: cli.resolve)."""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import spin
from machinery import cli, flags
from machinery.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
SOURCES = re.compile(r"default|recipe \S+|config file \S+|command line|launcher environment"
                     r"|derived")


def options(parser):
    """The parser's flags, help excluded."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("parser", [flags.parser, flags.generate_parser],
                         ids=["spin", "generate"])
def test_every_flag_has_help(parser):
    for action in options(parser()):
        if action.dest == "local_rank":  # the deepspeed launcher passes it; no one types it
            continue
        assert isinstance(action.help, str) and len(action.help) > 10, action.option_strings


def help_entries(argv, monkeypatch, capsys) -> dict[str, str]:
    """--help, one entry per flag ({first option: its text, whitespace collapsed})."""
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping inside a flag's help
    with pytest.raises(SystemExit) as stop:
        spin.parse_args([*argv, "--help"])
    assert stop.value.code == 0
    body = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    lines = "\n".join(line for line in body.splitlines() if line.startswith("  "))  # no headings
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n(?=  -)", lines)}


@pytest.mark.parametrize("argv", [[], ["--model", "zephyr-7b-sft-full"],
                                  ["--model", "my/sft", "--dataset", "d.jsonl"]],
                         ids=["toy", "zephyr", "own model"])
def test_help_shows_the_value_a_run_without_the_flag_takes_and_where_it_comes_from(
        argv, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    entries = help_entries(argv, monkeypatch, capsys)
    args, sources = cli.resolve(flags.parser(), argv, derive=cli.derive)
    for action in options(flags.parser()):
        if action.help == argparse.SUPPRESS or f"--{action.dest}" in argv:
            continue
        if action.dest == "model":  # a run without --model is the toy
            value, source = "toy", "default"
        else:
            value, source = getattr(args, action.dest), sources[action.dest]
        where = "" if source == "default" else f", {source}"
        assert entries[action.option_strings[0]].endswith(
            f"(default: {flags.shown(value)}{where})"), action.dest
    recipe = argv[1] if argv else "toy"
    expected = {"toy": "(default: 3, recipe toy)", "zephyr-7b-sft-full": "(default: 4, recipe "
                "zephyr-7b-sft-full)", "my/sft": "(default: 4)"}  # the flag's own default: paper's
    assert entries["--iters"].endswith(expected[recipe])
    if recipe == "zephyr-7b-sft-full":  # 64 pairs per step on one process
        assert entries["--gradient_accumulation_steps"].endswith("(default: 8, derived)")


def print_config(argv, capsys) -> dict[str, tuple[str, str]]:
    """spin.py ARGV --print_config: {setting: (value as JSON, source)}; it must exit with 0."""
    with pytest.raises(SystemExit) as stop:
        spin.cli([*argv, "--print_config"])
    assert stop.value.code == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        name, rest = line.split(maxsplit=1)
        value, source = re.fullmatch(r"(.+?)\s{2,}(\S.*)", rest).groups()
        rows[name] = (value, source)
    return rows


@pytest.mark.parametrize("argv", [[], ["--model", "zephyr-7b-sft-full"]], ids=["toy", "zephyr"])
def test_print_config_names_every_setting_with_its_value_and_source(argv, monkeypatch, tmp_path,
                                                                    capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [*argv, "--output_dir", str(tmp_path / "run")]
    rows = print_config(argv, capsys)
    settings = cli.run_config(spin.parse_args(argv))
    assert list(rows) == list(settings)  # every setting config.json records, nothing else
    for name, (value, source) in rows.items():
        assert json.loads(value) == settings[name], name
        assert SOURCES.fullmatch(source), (name, source)
    assert not (tmp_path / "run").exists()  # nothing written
    assert rows["output_dir"][1] == "command line" and rows["seed"][1] == "default"
    if argv[0] == "--model":
        assert rows["model"] == ('"alignment-handbook/zephyr-7b-sft-full"',
                                 "recipe zephyr-7b-sft-full")
        assert rows["beta"][1] == "recipe zephyr-7b-sft-full"
        assert rows["gradient_accumulation_steps"] == ("8", "derived")  # 64 pairs on 1 process
    else:
        assert rows["model"] == ('"toy"', "recipe toy") and rows["recipe"][1] == "default"


def test_print_config_names_a_config_file_and_the_launchers_environment(monkeypatch, tmp_path,
                                                                       capsys):
    """accelerate launch's environment stands for --bf16 and --deepspeed; --config for what it
    sets; the command line wins over both."""
    for name, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "bf16",
                        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "spin.yaml"
    config.write_text("beta: 0.5\nseed: 7\nmax_samples: null\n")
    rows = print_config(["--config", str(config), "--seed", "8",
                         "--output_dir", str(tmp_path / "run")], capsys)
    assert rows["beta"] == ("0.5", f"config file {config}")
    assert rows["seed"] == ("8", "command line")
    assert rows["max_samples"] == ("null", "default")  # null in a config file: not set
    assert rows["bf16"] == ("true", "launcher environment")
    assert rows["deepspeed"][1] == "launcher environment"
    assert rows["world_size"] == ("2", "launcher environment")
    assert rows["iters"] == ("3", "recipe toy")


def another(action):
    """A value of the flag's type that differs from its default."""
    default = action.default
    if action.choices:
        choice = next(c for c in action.choices if c not in (default, "none", "all", "sigmoid"))
        return [choice] if isinstance(default, list) else choice
    if isinstance(default, bool):
        return not default
    if isinstance(default, list):
        return [default[0] * 3] if isinstance(default[0], float) else ["other"]
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return default + 0.25
    return "other"


SETTABLE = [a for a in options(flags.parser()) if a.default is not None and a.dest != "model"]


def test_the_walk_covers_the_flags_that_had_a_default_before_recipes_could_set_them():
    """Before one precedence, a recipe could not set these nine (and the switches)."""
    names = {a.dest for a in SETTABLE}
    assert {"seed", "save_steps", "loss_type", "mix_previous_iteration", "turn", "lora_dropout",
            "report_to", "local_rank", "greedy", "deterministic", "quiet"} <= names
    assert len(names) >= 45  # every flag with a default: the former recipes.DEFAULTS too


@pytest.mark.parametrize("action", SETTABLE, ids=[a.dest for a in SETTABLE])
def test_every_flag_with_a_default_can_be_set_by_a_recipe_and_by_a_config_file(action, monkeypatch,
                                                                                tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    value = another(action)
    assert value != action.default
    monkeypatch.setitem(RECIPES, "probe", {"model": "my/sft", action.dest: value})
    args, sources = cli.resolve(flags.parser(), ["--model", "probe"], derive=cli.derive)
    assert getattr(args, action.dest) == value and sources[action.dest] == "recipe probe"
    config = tmp_path / "spin.json"
    config.write_text(json.dumps({action.option_strings[0].lstrip("-"): value}))
    args, sources = cli.resolve(flags.parser(), ["--model", "probe", "--config", str(config)],
                                derive=cli.derive)
    assert getattr(args, action.dest) == value and sources[action.dest] == f"config file {config}"


def test_the_command_line_wins_over_a_config_file_which_wins_over_the_recipe(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "spin.yaml"
    config.write_text("model: zephyr-7b-sft-full\nbeta: 0.5\niters: 2\nseed: 1\n")
    args = spin.parse_args(["--config", str(config), "--iters", "3"])
    assert (args.iters, args.beta, args.seed, args.max_samples) == (3, 0.5, 1, 50_000)


def test_every_recipe_entry_is_a_flag():
    dests = {a.dest for a in flags.parser()._actions}
    for name, recipe in RECIPES.items():
        assert set(recipe) <= dests, name


def test_a_runs_config_json_lists_read_back_as_they_were_written(monkeypatch, tmp_path):
    """--eval_tasks parses "a,b" into a list; config.json records the list, which --config must
    take as it is (not split again into [["a", "b"]])."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"eval_tasks": ["arc_easy", "hellaswag"]}))
    args, _ = cli.resolve(flags.parser(), ["--config", str(config)])
    assert args.eval_tasks == ["arc_easy", "hellaswag"]


@pytest.mark.slow
def test_print_config_of_the_zephyr_recipe_runs_offline_in_seconds(tmp_path):
    """The command a researcher types, in a fresh process (HF_HUB_OFFLINE=1, from conftest)."""
    started = time.time()
    result = subprocess.run([sys.executable, "spin.py", "--model", "zephyr-7b-sft-full",
                             "--output_dir", str(tmp_path / "run"), "--print_config"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.time() - started < 30  # the bound, on a 2-core machine shared with others
    assert "recipe zephyr-7b-sft-full" in result.stdout and not (tmp_path / "run").exists()
