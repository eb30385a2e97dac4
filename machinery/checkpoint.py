"""The run directory is the state of a SPIN run: re-running the same command resumes it.

Not part of the paper: what makes Algorithm 1 survive a killed job. Every file that marks
progress is written whole or not at all (write to a temporary name, fsync, rename); an iteration
is complete only when its marker `iter{t}/complete.json` exists, and that is written last.

    iter{t}/generated.rank{r}.jsonl   rank r's sampled responses, appended a generation batch at
                                      a time
    iter{t}/synthetic.jsonl           all of iteration t's pairs, once generation is complete
    iter{t}/opponent_logps.jsonl      log p_θt of every training pair, once the pass is complete
    iter{t}/checkpoint/               training state every --save_steps and at a stop signal: model,
                                      optimizer, scheduler, step, RNG (the data order is a function
                                      of the step); under ZeRO-3 each rank's partition (backends.py)
    iter{t}/model/                    θ_{t+1}
    iter{t}/complete.json             the iteration's summary row: written last
"""
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from machinery import distributed

# Settings that do not change what a run computes: a re-run may differ in these and still resume.
# `iters` is here so that a finished run can be continued for more iterations.
NOT_RESULTS = {"iters", "quiet", "output_dir", "overwrite_output_dir", "save_steps",
               "gradient_checkpointing",
               "attn_implementation", "rank", "local_rank", "report_to", "push_to_hub",
               "hub_model_id", "hub_private_repo", "deterministic", "fast_logps", "lora_dropout",
               "eval_models"}  # which models lm-eval scores: not what training computed


class RunDirError(ValueError):
    """A run directory this command cannot use (in use, not a run, other settings): one line,
    exit 2."""


class ConfigMismatch(RunDirError):
    pass


class RunInUse(RunDirError):
    pass


LOCK = ".lock"  # <run>/.lock: held (flock) by the process that runs in the directory
STARTUP_LEFTOVERS = {LOCK, "config.json.tmp"}  # all that a start killed before config.json leaves
_held: list[int] = []  # open lock descriptors: the lock lasts as long as the process


def lock(run: Path) -> None:
    """One run per directory: hold an exclusive flock on <run>/.lock until this process ends, with
    "host pid" written in it. The kernel releases the flock when the process dies, SIGKILL included,
    so a killed run leaves no stale lock, only its name, which the next run notes and replaces. A
    second process (a resubmitted job, the same command started twice) is refused before it writes
    anything. Where the file system has no locks (some network file systems), the name alone
    decides: a live process of this host, or any process of another host, keeps the directory."""
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    holder = os.read(fd, 256).decode(errors="replace").split()
    host, pid = (holder[0],
                 int(holder[1])) if len(holder) == 2 and holder[1].isdigit() else (None, None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        in_use = False
    except BlockingIOError:
        in_use = True
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks here
        in_use = host is not None and (host != socket.gethostname() or _alive(pid))
    if in_use:
        os.close(fd)
        raise RunInUse(f"--output_dir {run} is in use by another SPIN run (pid {pid or 'unknown'} "
                       f"on host {host or 'unknown'}); wait for it to end (then the same command "
                       f"resumes it), or choose another --output_dir") from None
    if host is not None and (host, pid) != (socket.gethostname(), os.getpid()):
        print(f"note: {run / LOCK} named pid {pid} on host {host}, which stopped without releasing "
              f"it (killed); taken over")
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    os.fsync(fd)
    _held.append(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unlock() -> None:
    """Release the run directories this process holds (the end of spin.main; a process exit does it
    too, but leaves the name in the file)."""
    while _held:
        fd = _held.pop()
        os.ftruncate(fd, 0)  # a clean end leaves no name to take over
        os.close(fd)  # closing the descriptor releases its flock


def empty(run: Path) -> None:
    """Remove everything in the run directory but the lock this process holds
    (--overwrite_output_dir)."""
    for path in run.iterdir():
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append whole lines and fsync; a kill can tear at most the last line (read_jsonl drops it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file; a torn last line (no newline) from a kill is ignored."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # whatever follows the last newline is incomplete
    return [json.loads(line) for line in lines if line]


# Settings added after runs were made without them: what those runs did.
ADDED_LATER = {"group_by_length": False,  # random optimizer steps before --group_by_length existed
               "padding_free": False,  # padded rows before --padding_free existed
               "use_peft": False, "lora_r": 16, "lora_alpha": 32,
               "lora_target_modules": ["all-linear"],
               "load_in_4bit": False, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
               "use_bnb_nested_quant": False}  # full fine-tuning before --use_peft existed


def check_config(run: Path, config: dict) -> None:
    """Refuse to mix results of different configurations in one run directory."""
    recorded = {**ADDED_LATER, **json.loads((run / "config.json").read_text())}
    for key in sorted(set(recorded) | set(config)):
        if key not in NOT_RESULTS and recorded.get(key) != config.get(key):
            raise ConfigMismatch(
                f"--output_dir {run} was run with {key}={recorded.get(key)!r}, now "
                f"{key}={config.get(key)!r}; use the same setting to resume, or pass "
                f"--overwrite_output_dir to start over")


def save_model(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """save_pretrained into a temporary directory, then rename: a model directory is whole or
    absent."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Inside a process group transformers writes on global rank 0 only; nodes that keep their own
    # run directory need the model on their disk too, so whoever calls this writes (the callers
    # choose).
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(tmp, state_dict=state_dict)  # safetensors
    finally:
        del model.should_save_on_this_rank
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    fsync_dir(path.parent)


def clean(it: Path) -> None:
    """Remove what a complete iteration no longer needs (also what a kill right after its marker
    left)."""
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "model.tmp"):
        shutil.rmtree(it / name, ignore_errors=True)
    for path in [*it.glob("generated.rank*.jsonl"), *it.glob("*.jsonl.tmp")]:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, path: Path) -> None:
    """Make the finished directory `tmp` the new `path`: its files fsynced, then two renames, so
    that there is never a moment without one whole directory on disk (saved_state finds
    `path`.old)."""
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def saved_state(path: Path) -> Path | None:
    """The training state directory to resume from: `path`, or `path`.old when a kill came between
    replace_dir's two renames; None when nothing was saved."""
    for candidate in (path, path.with_name(path.name + ".old")):
        if candidate.is_dir() and any(candidate.iterdir()):
            return candidate
    return None


def save_training_state(path: Path, model, optimizer, scheduler, step: int) -> None:
    """Everything training needs to continue at `step` exactly as if it had not stopped."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, None, tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "rng": torch.get_rng_state()}, tmp / "state.pt")
    replace_dir(tmp, path)


def load_training_state(path: Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint saved by save_training_state (path: from saved_state); returns the step
    to continue from."""
    from safetensors.torch import load_file

    adapter = path / "model" / "adapter_model.safetensors"
    if adapter.exists():  # --use_peft: the adapters are the trained weights
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
    else:
        model.load_state_dict(load_file(path / "model" / "model.safetensors"), strict=False)
    # tensors and numbers only: nothing unpickled
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"]


def agreed(run: Path, what: str, value):
    """`value` when every rank found the same in its run directory (nodes with copies of their own
    must hold the same copy); else the run is refused, naming what differs. A collective."""
    seen = distributed.all_gather([value])
    if len(set(seen)) > 1:
        raise RunDirError(f"--output_dir {run}: the nodes' copies differ in whether the run {what} "
                          f"({', '.join(f'rank {r}: {v}' for r, v in enumerate(seen))}); give "
                          f"every node the same copy, or one shared directory")
    return value
