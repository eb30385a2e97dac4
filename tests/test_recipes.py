"""The recipe resolves to exactly the table in docs/scaling.md; explicit flags override it."""
import re
from pathlib import Path

import pytest

import spin

TABLE = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text().split("## The recipe")[1].split("##")[0]


def documented() -> dict:
    rows = re.findall(r"^\| `--(\w+)` \| (.+?) \| .+ \|$", TABLE, flags=re.M)
    return dict(rows)


def as_text(value) -> str:
    if isinstance(value, list):
        return " ".join(f"{v:g}".replace("e-0", "e-") for v in value)
    if value == "":
        return '""'  # the empty string, written as it is typed on the command line
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_the_docs_table_is_the_recipe(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from recipes import RECIPES

    table = documented()
    args = spin.parse_args(["--model", "zephyr-7b-sft-full"])
    assert set(table) == set(RECIPES["zephyr-7b-sft-full"])  # every setting documented, nothing else
    for flag, text in table.items():
        assert as_text(getattr(args, flag)) == text, flag


def test_explicit_flags_override_the_recipe(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = spin.parse_args(["--model", "zephyr-7b-sft-full", "--beta", "0.5", "--learning_rate", "1e-6",
                            "--max_samples", "100", "--no-bf16", "--temperature", "0.7"])
    assert (args.beta, args.learning_rate, args.max_samples, args.bf16, args.temperature) == (0.5, [1e-6], 100, False, 0.7)
    assert args.num_train_epochs == 2 and args.max_length == 1024  # the rest stays the recipe's


@pytest.mark.parametrize("world, per_device, accumulation", [(1, 8, 8), (8, 8, 1), (4, 8, 2), (8, 4, 2)])
def test_global_batch_64_on_any_number_of_gpus(monkeypatch, world, per_device, accumulation):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = spin.parse_args(["--model", "zephyr-7b-sft-full", "--per_device_train_batch_size", str(per_device)])
    assert args.gradient_accumulation_steps == accumulation
    assert per_device * accumulation * world == 64


def test_a_relaunch_on_several_gpus_runs_the_same_command_under_deepspeed(monkeypatch):
    import distributed

    monkeypatch.delenv("RANK", raising=False)
    argv = ["spin.py", "--model", "zephyr-7b-sft-full"]
    assert distributed.relaunch_command(argv, 8) == ["deepspeed", "--num_gpus", "8", *argv]
    assert distributed.relaunch_command(argv, 1) is None  # one GPU: no launcher needed
    monkeypatch.setenv("RANK", "0")
    assert distributed.relaunch_command(argv, 8) is None  # already launched


def test_without_network_the_recipe_fails_with_one_line_naming_the_hub_id(tmp_path, capsys):
    code = spin.cli(["--model", "zephyr-7b-sft-full", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "alignment-handbook/zephyr-7b-sft-full could not be loaded from the Hugging Face Hub" in err
    assert "--model DIR" in err
