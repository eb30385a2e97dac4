"""Reliability: a run killed with SIGKILL anywhere resumes to the same result; bad states are refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_jsonl, toy_run

pytestmark = pytest.mark.slow  # starts processes, kills them, runs spin.py end to end

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()),
       "OMP_NUM_THREADS": "1",  # one thread: the float sums are the same from run to run
       "CUDA_VISIBLE_DEVICES": ""}  # bit for bit is a CPU fact (on CUDA: --deterministic, docs/scaling.md)


def command(model, run, *extra):
    return [sys.executable, str(ROOT / "spin.py"), *toy_run(model, run, "--max_samples", 96, "--iters", 2,
            "--generation_batch_size", 8, "--per_device_train_batch_size", 8, "--save_steps", 4,
            "--eval_samples", 20, *extra)]  # --eval_samples: a small held-out set


def run_to_end(model, run, *extra):
    result = subprocess.run(command(model, run, *extra), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def kill_when(model, run, ready, timeout=240, sig=signal.SIGKILL, extra=()):
    """Start a run, send it `sig` as soon as ready(run) holds; return (exit status, stderr) once it
    has ended, or None when it ended before ready(run) held. Its stdout, unbuffered, is in <run>.stdout."""
    with open(run.with_name(run.name + ".stderr"), "w+") as stderr, open(run.with_name(run.name + ".stdout"), "w") as out:
        process = subprocess.Popen(command(model, run, *extra), env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                   stderr=stderr)
        deadline = time.time() + timeout
        while process.poll() is None and time.time() < deadline:
            if ready(run):
                process.send_signal(sig)
                process.wait(timeout=120)
                stderr.seek(0)
                return process.returncode, stderr.read()
            time.sleep(0.002)
        process.kill()
        return None


def lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


KILL_POINTS = {  # where the kills land, in the order a run reaches them, as seen from the run directory
    "during generation": lambda run: lines(run / "iter0" / "generated.rank0.jsonl") >= 3,
    "mid-training": lambda run: (run / "iter0" / "checkpoint").exists(),
    "between iterations": lambda run: (run / "iter0" / "complete.json").exists(),
    "during the opponent log-prob pass": lambda run: (run / "iter1" / "synthetic.jsonl").exists()
    and not (run / "iter1" / "opponent_logps.jsonl").exists(),
}


@pytest.fixture(scope="module")
def reference(small_sft_model, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(small_sft_model, run)
    return run


def test_a_run_killed_at_every_stage_resumes_each_time_to_the_same_weights_and_data(small_sft_model, reference,
                                                                                   tmp_path):
    """SIGKILL at each of KILL_POINTS in turn: one run killed four times, each time started again by the
    same command, ends bit for bit where the uninterrupted run does."""
    run = tmp_path / "run"
    said = {}  # what the start killed at each point had printed
    for point, ready in KILL_POINTS.items():
        assert kill_when(small_sft_model, run, ready) is not None, f"the run ended before the kill point: {point}"
        said[point] = run.with_name("run.stdout").read_text()
        assert not (run / "iter1" / "complete.json").exists()
    stdout = run_to_end(small_sft_model, run)  # the same command again
    # The start after the kill during generation kept the whole batches; the one after the mid-training kill resumed there.
    assert "generated responses in" in said["mid-training"] and "sampling the rest" in said["mid-training"]
    assert "resuming training at step" in said["between iterations"]
    assert "reusing the opponent log-probs" in said["between iterations"]
    assert "iterations 0..0 are complete" in stdout  # the last kill came in iteration 1
    for t in range(2):
        rows = read_jsonl(run / f"iter{t}" / "synthetic.jsonl")
        assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows}) and len(rows) == 96  # each once
        assert (run / f"iter{t}" / "synthetic.jsonl").read_text() == (reference / f"iter{t}" / "synthetic.jsonl").read_text()
        assert [m["step"] for m in read_jsonl(run / f"iter{t}" / "metrics.jsonl")] \
            == list(range(12 if t == 0 else 24))  # no step logged twice, none lost
        assert not (run / f"iter{t}" / "generated.rank0.jsonl").exists() and not (run / f"iter{t}" / "checkpoint").exists()
    # CPU, one thread, the same batches in the same order: the weights are bit-for-bit equal.
    weights = load_file(run / "iter1" / "model" / "model.safetensors")
    expected = load_file(reference / "iter1" / "model" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all((weights[k] == expected[k]).all() for k in weights)


def test_sigterm_mid_training_saves_the_state_at_that_step_and_the_rerun_is_bit_for_bit(small_sft_model, reference,
                                                                                         tmp_path):
    run = tmp_path / "run"
    stopped = kill_when(small_sft_model, run, lambda run: lines(run / "iter0" / "metrics.jsonl") >= 6, sig=signal.SIGTERM)
    assert stopped is not None, "the run ended before the signal"
    status, stderr = stopped
    assert status == 75, stderr[-2000:]  # preemption.EXIT_RESUMABLE: stopped, not failed
    stopped_at = int(stderr.split("after step ")[1].split()[0])
    assert "stopped by SIGTERM in iteration 0" in stderr and stopped_at >= 6  # the step in progress was finished
    assert torch.load(run / "iter0" / "checkpoint" / "state.pt", weights_only=True)["step"] == stopped_at
    assert lines(run / "iter0" / "metrics.jsonl") == stopped_at and not (run / "iter0" / "complete.json").exists()
    stdout = run_to_end(small_sft_model, run)
    assert f"resuming training at step {stopped_at} of 12" in stdout
    weights = load_file(run / "iter1" / "model" / "model.safetensors")
    expected = load_file(reference / "iter1" / "model" / "model.safetensors")
    assert all((weights[k] == expected[k]).all() for k in expected)


def test_a_complete_run_is_not_redone_and_can_be_extended(small_sft_model, reference, tmp_path):
    stdout = run_to_end(small_sft_model, reference)
    assert "iterations 0..1 are complete" in stdout
    assert len((reference / "iterations.jsonl").read_text().splitlines()) == 2


def test_a_different_setting_is_refused_by_name(small_sft_model, reference):
    before = sorted(p.name for p in reference.rglob("*"))
    result = subprocess.run(command(small_sft_model, reference, "--beta", "0.5"), env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "beta=1.0, now beta=0.5" in result.stderr
    assert sorted(p.name for p in reference.rglob("*")) == before


def test_a_diverging_run_stops_with_a_clear_message_and_marks_nothing_complete(small_sft_model, tmp_path):
    run = tmp_path / "run"
    cmd = command(small_sft_model, run)
    cmd[cmd.index("--learning_rate") + 1] = "1e30"  # RMSProp moves each weight by ~lr: nan at step 1
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "non-finite loss" in result.stderr
    assert "iteration 0, step 1" in result.stderr and "a re-run restarts the iteration" in result.stderr
    assert not (run / "iter0" / "complete.json").exists() and not (run / "iter0" / "model").exists()


QUICK = ["--max_samples", "32", "--iters", "1", "--eval_samples", "0", "--per_device_train_batch_size", "8"]  # --eval_samples 0 overrides command()'s 20


def quick(model, run, *extra):
    return command(model, run, *QUICK, *extra)[2:]  # the flags, for spin.cli in this process


@pytest.mark.parametrize("left", [["config.json.tmp"], [".lock", "config.json.tmp"], []])
def test_a_start_killed_before_its_config_is_taken_over_by_the_same_command(small_sft_model, tmp_path, left, capsys):
    """A kill between creating the directory and renaming config.json.tmp leaves only these files."""
    import spin

    run = tmp_path / "run"
    run.mkdir()
    for name in left:
        (run / name).write_text('{"model": "half-writ')
    assert spin.cli(quick(small_sft_model, run)) == 0
    out = capsys.readouterr().out
    assert ("holds only what a start stopped before writing config.json left" in out) == bool(left)
    assert (run / "iter0" / "complete.json").exists() and json.loads((run / "config.json").read_text())["iters"] == 1
    assert not (run / "config.json.tmp").exists()


def test_a_second_run_on_a_directory_in_use_is_refused_before_it_writes_anything(small_sft_model, tmp_path, capsys):
    import fcntl

    import spin

    run = tmp_path / "run"
    assert spin.cli(quick(small_sft_model, run)) == 0
    holder = os.open(run / ".lock", os.O_RDWR)  # what another process running in the directory holds
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(holder, b"node-7 4242\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    try:
        for extra in ([], ["--iters", "2"], ["--overwrite_output_dir"]):
            assert spin.cli(quick(small_sft_model, run, *extra)) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"--output_dir {run} is in use by another SPIN run (pid 4242 on host node-7)" in err
            assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        os.close(holder)
    assert spin.cli(quick(small_sft_model, run, "--iters", "2")) == 0  # free again: the same command resumes
    out = capsys.readouterr().out
    assert "resuming" in out and "named pid 4242 on host node-7, which stopped without releasing it" in out
    assert (run / ".lock").read_text() == ""  # a clean end leaves no name behind


def test_sigusr1_during_generation_stops_after_the_batch_and_keeps_what_was_sampled(small_sft_model, tmp_path, capsys):
    import spin

    run, shard = tmp_path / "run", tmp_path / "run" / "iter0" / "generated.rank0.jsonl"
    stopped = kill_when(small_sft_model, run, lambda run: lines(shard) >= 1, sig=signal.SIGUSR1, extra=QUICK)
    assert stopped is not None and stopped[0] == 75, stopped
    assert "stopped by SIGUSR1 while sampling iteration 0's responses" in stopped[1]
    kept = lines(shard)
    assert 1 <= kept < 32 and kept % 8 == 0 and not (run / "iter0" / "synthetic.jsonl").exists()  # whole batches
    assert spin.cli(quick(small_sft_model, run)) == 0
    assert f"found {kept} of 32 generated responses" in capsys.readouterr().out
    assert len(read_jsonl(run / "iter0" / "synthetic.jsonl")) == 32


def test_two_runs_started_together_on_one_directory_one_runs_one_is_refused(small_sft_model, tmp_path):
    run = tmp_path / "run"
    processes = [subprocess.Popen(command(small_sft_model, run, *QUICK), env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=240), p.stderr.read()) for p in processes)
    assert [code for code, _ in results] == [0, 2]
    assert results[1][1].count("\n") == 1 and "--output_dir" in results[1][1] and "Traceback" not in results[1][1]
    steps = [m["step"] for m in read_jsonl(run / "iter0" / "metrics.jsonl")]
    assert steps == list(range(len(steps)))  # one history, no step twice


BEFORE_THE_PACKAGE = "b21a607"  # the last commit before machinery/ (issue 25): its run directories must resume


def test_a_run_directory_made_before_the_package_resumes(small_sft_model, tmp_path):
    """The run-directory format is kept: a run made by the code of BEFORE_THE_PACKAGE (its files taken from
    git history), one iteration, is continued by today's spin.py for a second."""
    old = tmp_path / "old-code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_THE_PACKAGE], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"git history without {BEFORE_THE_PACKAGE} (a shallow or exported copy)")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    run = tmp_path / "run"
    flags = toy_run(small_sft_model, run, "--max_samples", 16, "--per_device_train_batch_size", 8,
                    "--eval_samples", 4, "--iters", 1)
    made = subprocess.run([sys.executable, str(old / "spin.py"), *flags], cwd=old, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    resumed = subprocess.run([sys.executable, str(ROOT / "spin.py"), *flags, "--iters", "2"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "iterations 0..0 are complete" in resumed.stdout
    assert (run / "iter1" / "complete.json").exists()
    assert len(read_jsonl(run / "iterations.jsonl")) == 2
