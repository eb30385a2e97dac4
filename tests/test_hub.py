"""--push_to_hub (hub.py). The refusals are real (offline mode, no token: tests/test_bad_input.py and
below). The upload itself needs the Hub's server, which cannot run here (no network, and it is not a
package), so it is checked against a stand-in for huggingface_hub.HfApi that records what would be
sent: the repository, each commit's files and bytes, its message, and the branches."""
import types

import huggingface_hub
import pytest

import spin
from conftest import read_jsonl, toy_run

SMALL = ["--iters", "2", "--max_samples", "64", "--per_device_train_batch_size", "32", "--generation_batch_size", "64",
         "--eval_samples", "8"]


class StandInHub:
    """Records HfApi calls; answers as the Hub does (a commit has an oid and a URL)."""

    def __init__(self, run):
        self.run, self.calls = run, []

    def create_repo(self, repo_id, exist_ok=False, private=None):
        self.calls.append(("create_repo", repo_id, (self.run / "tokens.jsonl").exists()))

    def create_commit(self, repo_id, operations, commit_message):
        files = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        self.calls.append(("create_commit", repo_id, files, commit_message))
        oid = f"{len(self.calls):040x}"
        return types.SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")

    def create_branch(self, repo_id, branch, revision, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, revision))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    stand_in = StandInHub(tmp_path / "run")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stand_in")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: stand_in)
    return stand_in


@pytest.mark.slow  # runs spin.py end to end
def test_each_completed_iteration_is_one_commit_with_its_model_card_and_the_plot(small_sft_model, tmp_path, hub):
    """Iteration 0 run without --push_to_hub; the run extended to 2 iterations with it pushes iteration 0
    first (complete, not pushed), then iteration 1 when it completes; a third start pushes nothing."""
    run = tmp_path / "run"
    argv = toy_run(small_sft_model, run, *SMALL)
    assert spin.cli(argv + ["--iters", "1"]) == 0
    assert hub.calls == []
    assert spin.cli(argv + ["--push_to_hub", "--hub_model_id", "me/spin-toy"]) == 0
    assert hub.calls[0] == ("create_repo", "me/spin-toy", True)  # at start-up, before the push of iteration 0
    commits = [c for c in hub.calls if c[0] == "create_commit"]
    assert [c[3].split(":")[0] for c in commits] == ["SPIN iteration 0", "SPIN iteration 1"]
    for t, (_, repo, files, _) in enumerate(commits):
        model = run / f"iter{t}" / "model"
        assert repo == "me/spin-toy"
        assert sorted(files) == sorted([p.name for p in model.iterdir()] + ["spin.png", "evaluation.jsonl", "spin_config.json"])
        assert files["config.json"] == (model / "config.json").read_bytes()  # the model's, not the run's
        assert files["spin_config.json"] == (run / "config.json").read_bytes()
        assert files["model.safetensors"] == (model / "model.safetensors").read_bytes()
        assert files["README.md"] == (model / "README.md").read_bytes()  # the card of this iteration
        assert files["spin.png"][:8] == b"\x89PNG\r\n\x1a\n"
        assert len(files["evaluation.jsonl"].decode().splitlines()) == t + 2  # the start and every model up to θ_{t+1}
    branches = [c for c in hub.calls if c[0] == "create_branch"]
    assert [(b[2], b[3]) for b in branches] == [("iter0", f"{2:040x}"), ("iter1", f"{4:040x}")]  # each at its commit
    assert read_jsonl(run / "iter1" / "pushed.json")[0]["commit"] == f"{4:040x}"
    assert spin.cli(argv + ["--push_to_hub", "--hub_model_id", "me/spin-toy"]) == 0
    assert len([c for c in hub.calls if c[0] == "create_commit"]) == 2  # already pushed: not again


def test_without_a_token_the_run_stops_before_any_work(small_sft_model, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert spin.cli(toy_run(small_sft_model, tmp_path / "run", *SMALL, "--push_to_hub")) == 2
    assert capsys.readouterr().err == ("error: --push_to_hub needs a Hugging Face token with write access: "
                                       "`hf auth login` or HF_TOKEN\n")
    assert not (tmp_path / "run").exists() and hub.calls == []
