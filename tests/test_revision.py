"""--use_peft with a pinned --model_revision: every load of the base uses that revision (issue
31, finding 1). A local Hugging Face cache, in the hub's layout, holds two revisions of a tiny
model that differ in every tensor, `main` the newer; a run pinned to the older must build θ_1 (the
base plus iteration 0's adapter) and merged/ on the older, never on `main`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
from conftest import ROOT, read_jsonl, tiny_mistral, toy_run
from test_adapters import scored

peft = pytest.importorskip("peft", reason="--use_peft needs peft (requirements.txt)")

REPO = "spin-test/tiny"
PINNED, MAIN = "1" * 40, "2" * 40  # commit hashes: the older revision and `main`, the newer


def write_cache(home, tokenizer):
    """HF_HOME=home: home/hub/models--spin-test--tiny/snapshots/{PINNED,MAIN}/, refs/main -> MAIN
    (huggingface_hub's constants: HF_HUB_CACHE defaults to $HF_HOME/hub). Returns both snapshots."""
    pinned, main = tiny_mistral(tokenizer, seed=0), tiny_mistral(tokenizer, seed=1)
    with torch.no_grad():  # another seed changes every matrix; the norms (all ones) change too
        for p in main.parameters():
            p.mul_(1.5)
    assert all(not torch.equal(a, b)
               for a, b in zip(pinned.state_dict().values(), main.state_dict().values()))
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshots = {}
    for commit, model in ((PINNED, pinned), (MAIN, main)):
        snapshots[commit] = repo / "snapshots" / commit
        model.save_pretrained(snapshots[commit])
        tokenizer.save_pretrained(snapshots[commit])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    return snapshots


def with_adapter(snapshot, adapter):
    """The base of `snapshot` plus the adapter directory, loaded by peft from explicit paths."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(snapshot), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


@pytest.mark.slow
def test_a_pinned_revision_is_the_base_of_every_iteration_and_of_the_merged_model(
        tmp_path, tokenizer, monkeypatch):
    snapshots = write_cache(tmp_path / "hf", tokenizer)
    run = tmp_path / "run"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # for the run only; undone after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # they would win over HF_HOME
        monkeypatch.delenv(name, raising=False)
    # 8 of the toy's rows as a file: --dataset toy would also score 200 test prompts per model
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": r["messages"][0]["content"],
                                        "response": r["response"]}) + "\n"
                            for r in data.toy_rows("train")[:8]))
    flags = toy_run(REPO, run, "--dataset", rows, "--eval_samples", 0, "--model_revision", PINNED,
                    "--use_peft", "--iters", 2, "--per_device_train_batch_size", 8,
                    "--max_new_tokens", 6)
    result = subprocess.run([sys.executable, str(ROOT / "spin.py"), *flags], capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]

    # the adapter names its base and the base's revision (peft's "revision" field)
    adapter, final = run / "iter0" / "model", run / "iter1" / "model"
    for saved in (adapter, final):
        config = json.loads((saved / "adapter_config.json").read_text())
        assert (config["base_model_name_or_path"], config["revision"]) == (REPO, PINNED)

    # iteration 1's opponent, θ_1 = the pinned base + iteration 0's adapter, as the run stored it
    pairs = [*read_jsonl(run / "iter1" / "synthetic.jsonl"),
             *read_jsonl(run / "iter0" / "synthetic.jsonl")]  # the order the run scored them
    stored = {(s["iteration"], s["id"]): s
              for s in read_jsonl(run / "iter1" / "opponent_logps.jsonl")}
    run_logps = torch.tensor([[stored[(p["iteration"], p["id"])][f"opponent_{k}_logp"]
                               for k in ("real", "generated")] for p in pairs])
    pinned_logps = scored(with_adapter(snapshots[PINNED], adapter), pairs, run)
    main_logps = scored(with_adapter(snapshots[MAIN], adapter), pairs, run)
    # the same pairs in the same batches through the same code: only float32 rounding could differ
    assert torch.allclose(run_logps, pinned_logps, atol=1e-5)
    # main's base gives other log-probs, four orders of magnitude past float32 rounding (the two
    # random models are near uniform over the vocabulary, so a pair may come close by chance)
    assert (run_logps - main_logps).abs().max() > 0.1

    # merged/ = the pinned base + the final adapter, merged as adapters.merge merges (peft's
    # merge_and_unload in float32 on the same tensors: equal bit for bit), and nothing of main's
    merged = load_file(run / "merged" / "model.safetensors")
    pinned, main = (with_adapter(snapshots[c], final).merge_and_unload().state_dict()
                    for c in (PINNED, MAIN))
    assert merged.keys() == pinned.keys() == main.keys()
    assert all(torch.equal(merged[k], pinned[k]) for k in merged)
    assert not any(torch.equal(merged[k], main[k]) for k in merged)
