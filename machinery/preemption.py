"""Stopping when the cluster says so: SIGTERM, SIGUSR1 and Ctrl-C stop a run at the next safe point,
with its state saved, instead of killing it. Not part of the paper; what a preempted job needs.

    the signal arrives          a flag is set; nothing is interrupted
    training                    the current optimizer step finishes, every rank agrees on the step,
                                the training state is saved (iter{t}/checkpoint), the run stops
    generation                  the current batch finishes and is appended to its shard
    between phases              after the opponent pass and after each iteration's report
    then                        spin.py exits with EXIT_RESUMABLE; the same command resumes the run

Schedulers send SIGTERM and wait a grace period before SIGKILL (SLURM's KillWait, 30 s by default;
torchrun and the deepspeed launcher forward SIGTERM to their workers and kill them 30 s later).
SLURM can warn ahead of time with `--signal=USR1@SECONDS` (to the processes that run spin.py: the
launchers forward only SIGTERM and SIGINT). A second Ctrl-C stops at once, as Ctrl-C usually does.
"""
import signal

from machinery import distributed

EXIT_RESUMABLE = 75  # EX_TEMPFAIL (sysexits.h): stopped, not failed; run the same command again

_received: list[str] = []


class Stopped(Exception):
    """The run stopped on a signal with its state saved: one line, exit status EXIT_RESUMABLE."""


def install() -> None:
    """Handle SIGTERM, SIGUSR1 and SIGINT in this process (the main thread) until it ends."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, _on_signal)


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and "SIGINT" in _received:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    if not _received:
        print(f"\n{name} received: stopping at the next safe point with the state saved"
              + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""), flush=True)
    _received.append(name)


def requested() -> str | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def agreed() -> str | None:
    """Whether any rank received a stop signal: every rank calls this at the same point and gets the
    same answer, so all of them stop at the same step (one all-reduce of one number)."""
    mine = requested()
    if distributed.any_rank(mine is not None):
        return mine or "a signal to another rank"
    return None


def stop_if_requested(where: str) -> None:
    """Between phases: stop here if any rank was signalled (what is done so far is on disk)."""
    signal_name = agreed()
    if signal_name:
        raise Stopped(f"stopped by {signal_name} {where}; run the same command to resume")


def reset() -> None:
    """Forget received signals and restore the default handlers (the end of a run in this
    process)."""
    _received.clear()
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
