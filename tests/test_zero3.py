"""DeepSpeed ZeRO-3 with two CPU ranks (DS_ACCELERATOR=cpu, the `deepspeed` launcher on loopback)
against the single-process path: the same data, the same losses, the same weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY_RUN, read_jsonl

pytestmark = pytest.mark.slow  # DeepSpeed launches (two CPU ranks) and killed processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}, "HF_HUB_OFFLINE": "1",
       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU ranks, also where GPUs exist
FLAGS = [*TOY_RUN, "--max_samples", "64", "--iters", "2", "--greedy"]
# Tolerance: the two ranks' gradients are summed by an all-reduce, in another order than one process
# sums them, so float32 results differ in the last bits. Measured (since logits are computed at
# response positions only): at most 3.6e-6 over the first iteration's losses; in the second,
# RMSProp (dividing by √v) amplifies them to at most 1.2e-3 mid-iteration, 7e-6 at its last step.
TOLERANCE = {0: 1e-5, 1: 2e-3}



def deepspeed_launch(*argv, timeout=400):
    command = ["deepspeed", "--num_gpus", "2", "--master_port", "29531", *argv]
    env = {**ENV, "PYTHONPATH": str(ROOT)}  # tests/zero3_worker.py imports the project's modules
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(small_sft_model, tmp_path_factory):
    zero3, single = tmp_path_factory.mktemp("zero3"), tmp_path_factory.mktemp("single")
    deepspeed_launch("spin.py", "--model", str(small_sft_model), *FLAGS, "--per_device_train_batch_size", "4",
                     "--deepspeed", "configs/ds_zero3.json", "--output_dir", str(zero3))
    subprocess.run([sys.executable, "spin.py", "--model", str(small_sft_model), *FLAGS,  # the reference: no fused head
                    "--per_device_train_batch_size", "8", "--output_dir", str(single)],
                   cwd=ROOT, env={**ENV, "SPIN_FUSED_HEAD": "0"}, check=True, capture_output=True, timeout=300)
    return zero3, single


def test_sharded_generation_merges_to_the_rows_of_one_rank(runs):
    zero3, single = runs
    for t in range(2):
        sharded, one = read_jsonl(zero3 / f"iter{t}" / "synthetic.jsonl"), read_jsonl(single / f"iter{t}" / "synthetic.jsonl")
        assert [r["id"] for r in sharded] == [r["id"] for r in one]  # same ids, same order, none lost
        assert len({r["id"] for r in sharded}) == 64  # no duplicates
        assert sharded == one  # greedy: the same responses, token for token


def test_zero3_follows_the_single_process_loss_trajectory(runs):
    zero3, single = runs
    for t in range(2):
        a, b = read_jsonl(zero3 / f"iter{t}" / "metrics.jsonl"), read_jsonl(single / f"iter{t}" / "metrics.jsonl")
        assert len(a) == len(b) == (8 if t == 0 else 16)
        assert a[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
        assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=TOLERANCE[t])


def test_zero3_checkpoints_load_with_from_pretrained_and_match(runs):
    from transformers import AutoModelForCausalLM

    zero3, single = runs
    for t in range(2):
        AutoModelForCausalLM.from_pretrained(zero3 / f"iter{t}" / "model")
        a = load_file(zero3 / f"iter{t}" / "model" / "model.safetensors")
        b = load_file(single / f"iter{t}" / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3  # measured 5.4e-5 before logps.py


def test_the_saved_checkpoint_equals_the_gathered_zero3_parameters(small_sft_model, tmp_path):
    out = tmp_path / "result.json"
    deepspeed_launch("tests/zero3_worker.py", str(small_sft_model), str(out))
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["names"]
    assert result["max_abs_diff"] == 0.0
    assert result["losses"][0] == pytest.approx(0.6931472, abs=1e-6)
    # The fused head under ZeRO-3: its weight's whole gradient reached the partitions (measured: 9.5e-7 of 6.04).
    assert result["head_grad_max_abs"] > 1 and result["head_grad_max_abs_diff"] < 1e-5 * result["head_grad_max_abs"]


def torchrun(model, run, *extra):
    return ["torchrun", "--nproc_per_node", "2", "--master_port", "29532", "spin.py", "--model", str(model), *FLAGS,
            "--iters", "1", "--per_device_train_batch_size", "4", "--deepspeed", "configs/ds_zero3.json",
            "--save_steps", "2", "--output_dir", str(run), *extra]


def signal_when(command, ready, sig, timeout=300):
    """Launch, send `sig` as soon as ready() holds, and return the launch's stdout + stderr once every
    process has ended."""
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.005)
    if sig == signal.SIGKILL:  # every process at once, like a node going away (the ranks run in their own sessions)
        for victim in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
            victim.kill()
    else:
        process.send_signal(sig)  # to torchrun alone, as a scheduler's SIGTERM reaches a launcher
    output, _ = process.communicate(timeout=120)
    return output


def test_zero3_resumes_mid_iteration_after_sigkill_and_saves_at_sigterm(runs, small_sft_model, tmp_path):
    """torchrun with two ranks, killed mid-iteration (SIGKILL to every process), resumed, stopped with
    SIGTERM (torchrun forwards it to the ranks, which finish the step and save), resumed to the end:
    the same losses as the uninterrupted ZeRO-3 run, from the steps the states were saved at."""
    zero3, _ = runs
    run, metrics = tmp_path / "run", tmp_path / "run" / "iter0" / "metrics.jsonl"
    signal_when(torchrun(small_sft_model, run), lambda: (run / "iter0" / "checkpoint").exists(), signal.SIGKILL)
    assert not (run / "iter0" / "complete.json").exists()
    output = signal_when(torchrun(small_sft_model, run), lambda: len(read_jsonl(metrics)) >= 5 if metrics.exists() else False,
                         signal.SIGTERM)
    assert "iteration 0: resuming training at step 2 of 8" in output, output[-3000:]  # not from the iteration's start
    stopped_at = int(output.split("stopped by SIGTERM in iteration 0 after step ")[1].split()[0])
    assert 5 <= stopped_at < 8  # the step in progress when the signal came was finished first
    state = torch.load(run / "iter0" / "checkpoint" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       weights_only=True)
    assert state["step"] == stopped_at == len(read_jsonl(metrics))
    result = subprocess.run(torchrun(small_sft_model, run), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"iteration 0: resuming training at step {stopped_at} of 8" in result.stdout
    steps = read_jsonl(metrics)
    assert [m["step"] for m in steps] == list(range(8))
    assert [m["loss"] for m in steps] == pytest.approx([m["loss"] for m in read_jsonl(zero3 / "iter0" / "metrics.jsonl")],
                                                       abs=TOLERANCE[0])


def two_nodes(model, runs, *extra):
    """Two torchrun launchers with one rank each, as two nodes rendezvousing on the loopback address."""
    launchers = [subprocess.Popen(["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                                   "--master_addr", "127.0.0.1", "--master_port", "29533", "spin.py", "--model", str(model),
                                   *FLAGS, "--iters", "1", "--per_device_train_batch_size", "4", "--deepspeed",
                                   "configs/ds_zero3.json", "--output_dir", str(run), *extra],
                                  cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for node, run in enumerate(runs)]
    outputs = [p.communicate(timeout=400)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]


@pytest.mark.parametrize("disk", ["one shared directory", "a copy on each node"])
def test_two_nodes_give_the_rows_and_losses_of_one_process(runs, small_sft_model, tmp_path, disk):
    zero3, single = runs
    copies = [tmp_path / "run"] * 2 if disk == "one shared directory" else [tmp_path / "node0", tmp_path / "node1"]
    two_nodes(small_sft_model, copies)
    for run in dict.fromkeys(copies):  # what every node's disk holds: all that its ranks read back
        assert read_jsonl(run / "iter0" / "synthetic.jsonl") == read_jsonl(single / "iter0" / "synthetic.jsonl")
        assert (run / "iter0" / "complete.json").exists() and (run / "iter0" / "model" / "model.safetensors").exists()
        assert load_file(run / "iter0" / "model" / "model.safetensors").keys() == load_file(
            zero3 / "iter0" / "model" / "model.safetensors").keys()
    losses = [m["loss"] for m in read_jsonl(copies[0] / "iter0" / "metrics.jsonl")]
    assert losses == pytest.approx([m["loss"] for m in read_jsonl(zero3 / "iter0" / "metrics.jsonl")], abs=TOLERANCE[0])
    assert (copies[0] / "evaluation.jsonl").exists()  # the reports: rank 0's disk
    if disk == "a copy on each node":
        assert not (copies[1] / "evaluation.jsonl").exists() and not (copies[1] / "metrics.jsonl").exists()
        a, b = (load_file(run / "iter0" / "model" / "model.safetensors") for run in copies)
        assert all((a[k] == b[k]).all() for k in a)  # both nodes wrote the same θ_1


def test_accelerate_launch_with_its_deepspeed_config_runs_the_same_zero3_iteration(runs, small_sft_model, tmp_path):
    """alignment-handbook's and the official SPIN code's launcher: configs/accelerate_zero3.yaml names
    configs/ds_zero3.json, which spin.py takes as its --deepspeed; two CPU ranks instead of 8 GPUs."""
    zero3, _ = runs
    result = subprocess.run(["accelerate", "launch", "--config_file", "configs/accelerate_zero3.yaml", "--num_processes",
                             "2", "--main_process_port", "29534", "spin.py", "--model", str(small_sft_model), *FLAGS,
                             "--iters", "1", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "run")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["deepspeed"] == "configs/ds_zero3.json"
    losses = [m["loss"] for m in read_jsonl(tmp_path / "run" / "iter0" / "metrics.jsonl")]
    assert losses == pytest.approx([m["loss"] for m in read_jsonl(zero3 / "iter0" / "metrics.jsonl")], abs=TOLERANCE[0])


@pytest.fixture(scope="module")
def lora_runs(small_sft_model, tmp_path_factory):
    """--use_peft under ZeRO-3 on two CPU ranks, and the same on one process (the reference)."""
    zero3, single = tmp_path_factory.mktemp("lora-zero3"), tmp_path_factory.mktemp("lora-single")
    deepspeed_launch("spin.py", "--model", str(small_sft_model), *FLAGS, "--use_peft", "--per_device_train_batch_size",
                     "4", "--save_steps", "2", "--deepspeed", "configs/ds_zero3.json", "--output_dir", str(zero3))
    subprocess.run([sys.executable, "spin.py", "--model", str(small_sft_model), *FLAGS, "--use_peft",
                    "--per_device_train_batch_size", "8", "--output_dir", str(single)],
                   cwd=ROOT, env={**ENV, "SPIN_FUSED_HEAD": "0"}, check=True, capture_output=True, timeout=300)
    return zero3, single


def test_lora_under_zero3_trains_the_adapters_of_one_process(lora_runs):
    """The same losses and the same adapters as one process (TOLERANCE: the all-reduce's order), each
    iteration starting at log 2; each iter{t}/model holds only the adapters and loads with peft."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    zero3, single = lora_runs
    for t in range(2):
        a, b = read_jsonl(zero3 / f"iter{t}" / "metrics.jsonl"), read_jsonl(single / f"iter{t}" / "metrics.jsonl")
        assert len(a) == len(b) == (8 if t == 0 else 16)
        assert a[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # θ = θ_t: the opponent's log-probs are θ_t's
        assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=TOLERANCE[t])
        model = zero3 / f"iter{t}" / "model"
        assert not (model / "model.safetensors").exists()  # the base is not gathered and saved again
        x, y = load_file(model / "adapter_model.safetensors"), load_file(single / f"iter{t}" / "model" / "adapter_model.safetensors")
        assert x.keys() == y.keys() and all("lora_" in k for k in x)
        assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-3  # as the full weights' bound above
        assert isinstance(AutoPeftModelForCausalLM.from_pretrained(str(model)), PeftModel)
    assert (zero3 / "merged" / "model.safetensors").exists()


def test_lora_under_zero3_resumes_after_sigkill_to_the_same_losses(lora_runs, small_sft_model, tmp_path):
    """torchrun with two ranks, every process killed once iteration 0 has a saved state, run again:
    DeepSpeed's partitions of the adapters (the frozen base is reloaded from θ_t) continue the run."""
    zero3, _ = lora_runs
    run = tmp_path / "run"
    signal_when(torchrun(small_sft_model, run, "--use_peft"), lambda: (run / "iter0" / "checkpoint").exists(),
                signal.SIGKILL)
    assert not (run / "iter0" / "complete.json").exists()
    result = subprocess.run(torchrun(small_sft_model, run, "--use_peft"), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "iteration 0: resuming training at step 2 of 8" in result.stdout
    losses = [m["loss"] for m in read_jsonl(run / "iter0" / "metrics.jsonl")]
    assert losses == pytest.approx([m["loss"] for m in read_jsonl(zero3 / "iter0" / "metrics.jsonl")], abs=TOLERANCE[0])


def test_zero3_accumulates_gradients_in_float32_under_bf16(tmp_path, monkeypatch):
    """configs/ds_zero3.json's data_types.grad_accum_dtype: under --bf16 the weights are bf16 and
    ZeRO-3 accumulates the micro-batches' gradients in float32, as the plain path does (DeepSpeed's
    default is the weights' dtype: get_data_types in deepspeed/runtime/engine.py). The engine the
    run builds (backends.trainer), of one CPU rank, in this process."""
    import math
    import socket

    import spin
    import toy
    from conftest import tiny_mistral
    from machinery import backends, distributed
    from machinery.prepare import weights_dtype

    with socket.socket() as s:  # a free port for the group of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    config = ROOT / "configs" / "ds_zero3.json"
    args = spin.parse_args(["--model", "toy", "--dataset", "toy", "--bf16", "--deepspeed",
                            str(config), "--output_dir", str(tmp_path / "run")])
    distributed.setup(args)
    try:
        model = tiny_mistral(toy.build_tokenizer()).to(weights_dtype(args))
        trainer = backends.trainer(model, torch.optim.RMSprop(model.parameters(), lr=1e-4), args)
        engine = trainer.policy
        assert engine.get_data_types() == (torch.bfloat16, torch.float32)  # (weights, accumulation)
        ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
        for last in (False, True):  # two micro-batches of one step
            trainer.backward(engine(input_ids=ids).logits.float().logsumexp(-1).mean(), last)
        accumulated = engine.optimizer.grad_partitions_flat_buffer  # ZeRO-3's gradient partitions
        assert accumulated.dtype == torch.float32 and accumulated.abs().sum() > 0
        assert math.isfinite(trainer.step())
        trainer.release()
    finally:
        torch.distributed.destroy_process_group()
