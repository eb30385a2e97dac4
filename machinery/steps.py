"""The bookkeeping around spin.train's loop, so that the loop shows only Eq. 4.7's steps: where a
stopped iteration resumes, metrics.jsonl, the progress bar, the training state every --save_steps,
a stop signal, a diverged step.

    steps = Steps(trainer, scheduler, iteration_dir=..., iteration=t, total=..., args=args)
    for step, ... in enumerate(batches):
        if steps.done(step): continue       # trained before a stop: resumed from iter{t}/checkpoint
        ...
        steps.log(record)                   # metrics.jsonl, the tracker, the bar
        steps.save_or_stop(step)            # every --save_steps; on a stop signal, save and stop
"""
import math
from pathlib import Path

from tqdm import tqdm

from machinery import checkpoint, distributed, preemption
from machinery.distributed import print0


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: shown as one line, exit status 1."""


class Steps:
    def __init__(self, trainer, scheduler, *, iteration_dir: Path, iteration: int, total: int,
                 args, on_step=None):
        self.trainer, self.scheduler = trainer, scheduler
        self.iteration, self.total = iteration, total
        self.args, self.on_step = args, on_step
        self.state = iteration_dir / "checkpoint"
        self.metrics = iteration_dir / "metrics.jsonl"
        # 0: the iteration starts from θ_t
        self.first = self.saved = trainer.load_state(self.state, scheduler)
        if self.first:
            print0(f"iteration {iteration}: resuming training at step {self.first} of {total} from "
                   f"{self.state}")
        self.history = [m for m in checkpoint.read_jsonl(self.metrics) if m["step"] < self.first]
        if args.rank == 0:
            # steps logged after the checkpoint are redone
            checkpoint.write_jsonl(self.metrics, self.history)
        self.bar = tqdm(total=total, initial=self.first, desc=f"train iteration {iteration}",
                        unit="step", disable=distributed.bars_off(args.quiet))

    def done(self, step: int) -> bool:
        """Whether `step` was trained before a stop (the resumed state comes after it)."""
        return step < self.first

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient stops the run, keeping the last good training state."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        kept = (f"the training state saved at step {self.saved} is kept in {self.state} and a "
                f"re-run resumes from "
                f"it" if self.saved else "no training state was saved yet: a re-run restarts the "
                                         "iteration")
        applied = "" if self.trainer.applies_before_check else " without applying the step"
        raise TrainingDiverged(
            f"iteration {self.iteration}, step {step}: non-finite loss {loss} or gradient norm "
            f"{grad_norm}; stopped{applied}; {kept} (or lower --learning_rate and pass "
            f"--overwrite_output_dir to start over)")

    def log(self, record: dict) -> None:
        if self.args.rank == 0:
            checkpoint.append_jsonl(self.metrics, [record])
            if self.on_step:
                self.on_step(record)
        self.history.append(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['margin']:.3f}",
                             acc=f"{record['reward_accuracy']:.2f}",
                             lr=f"{record['learning_rate']:.1e}")

    def save_or_stop(self, step: int) -> None:
        """After `step`: the training state every --save_steps; on a stop signal to any rank,
        every rank stops here, after the same step, with the state saved."""
        if (step + 1) % self.args.save_steps == 0 and step + 1 < self.total:
            self.trainer.save_state(self.state, self.scheduler, step + 1)
            self.saved = step + 1
        signal_name = preemption.agreed()
        if signal_name:
            if self.saved != step + 1:  # not saved a moment ago by --save_steps
                self.trainer.save_state(self.state, self.scheduler, step + 1)
            raise preemption.Stopped(
                f"stopped by {signal_name} in iteration {self.iteration} after step {step + 1} of "
                f"{self.total}; the training state is saved in {self.state}; run the same command "
                f"to resume")

    def close(self) -> list[dict]:
        """Every step's metrics of the iteration, those before a stop included."""
        self.bar.close()
        return self.history
