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
    from machinery.recipes import RECIPES

    table = documented()
    args = spin.parse_args(["--model", "zephyr-7b-sft-full"])
    assert set(table) == set(RECIPES["zephyr-7b-sft-full"])  # every setting documented, nothing else
    for flag, text in table.items():
        if flag == "attn_implementation":  # resolved by what this machine has (next test)
            assert text == RECIPES["zephyr-7b-sft-full"][flag]
            continue
        assert as_text(getattr(args, flag)) == text, flag


def test_the_recipes_flash_attention_falls_back_to_sdpa_where_it_cannot_run(monkeypatch):
    from machinery import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "flash_attention_available", lambda: False)
    assert spin.parse_args(["--model", "zephyr-7b-sft-full"]).attn_implementation == "sdpa"
    monkeypatch.setattr(cli, "flash_attention_available", lambda: True)  # a stand-in: no GPU on the test machines
    monkeypatch.setattr(cli, "validate", lambda args: None)
    assert spin.parse_args(["--model", "zephyr-7b-sft-full"]).attn_implementation == "flash_attention_2"


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


def test_a_relaunch_on_several_gpus_runs_the_same_command_under_torchrun(monkeypatch):
    import sys

    from machinery import distributed

    monkeypatch.delenv("RANK", raising=False)
    argv = ["spin.py", "--model", "zephyr-7b-sft-full"]
    assert distributed.relaunch_command(argv, 8) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", "8", *argv]
    assert distributed.relaunch_command(argv, 1) is None  # one GPU: no launcher needed
    monkeypatch.setenv("RANK", "0")
    assert distributed.relaunch_command(argv, 8) is None  # already launched


def test_without_network_the_recipe_fails_with_one_line_naming_the_hub_id(tmp_path, capsys):
    code = spin.cli(["--model", "zephyr-7b-sft-full", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "alignment-handbook/zephyr-7b-sft-full could not be loaded from the Hugging Face Hub" in err
    assert "--model DIR" in err


def test_the_hub_probe_goes_through_the_proxy_that_huggingface_hub_uses(monkeypatch, capsys):
    """A cluster whose only way out is HTTPS_PROXY/HTTP_PROXY: the probe must use it, not a raw socket."""
    import http.server
    import os
    import threading

    import huggingface_hub
    import huggingface_hub.constants

    from machinery import models

    seen = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # a forward proxy gets the absolute URL in the request line
            seen.append(self.requestline)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://hub.invalid")  # resolves nowhere
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_port}")
        huggingface_hub.close_session()  # the client reads the proxy settings when it is made
        models.go_offline_if_hub_unreachable("someone/some-model")
        assert seen == ["HEAD http://hub.invalid/ HTTP/1.1"]
        assert "HF_HUB_OFFLINE" not in os.environ  # reachable through the proxy: stays online
        monkeypatch.delenv("HTTP_PROXY")
        huggingface_hub.close_session()
        models.go_offline_if_hub_unreachable("someone/some-model")
        assert "note: http://hub.invalid cannot be reached" in capsys.readouterr().out
        assert os.environ["HF_HUB_OFFLINE"] == "1" and len(seen) == 1
    finally:
        server.shutdown()
        huggingface_hub.close_session()


def test_hugging_face_names_and_a_config_file_resolve_to_one_canonical_configuration(monkeypatch, tmp_path):
    """TRL / alignment-handbook names on the command line and in a YAML config; explicit flags win."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "spin.yaml"
    config.write_text("model_name_or_path: zephyr-7b-sft-full\ndataset_name: mine.jsonl\ndataset_train_split: train\n"
                      "loss_type: sigmoid\nlearning_rate: 1e-6\nbeta: 0.5\nbf16: false\n")
    args = spin.parse_args(["--config", str(config), "--beta", "0.2"])
    assert (args.model, args.dataset, args.dataset_split, args.loss_type) == \
        ("alignment-handbook/zephyr-7b-sft-full", "mine.jsonl", "train", "logistic")  # the recipe still applies
    assert (args.learning_rate, args.beta, args.bf16, args.num_train_epochs) == ([1e-6], 0.2, False, 2)
    same = spin.parse_args(["--model_name_or_path", "zephyr-7b-sft-full", "--dataset_name", "mine.jsonl",
                            "--dataset_train_split", "train", "--loss_type", "sigmoid", "--learning_rate", "1e-6",
                            "--beta", "0.2", "--no-bf16"])
    assert vars(same) == {**vars(args), "config": None}
