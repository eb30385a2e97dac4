"""Several processes: sharded generation and DeepSpeed ZeRO-3 training. Not part of the paper's
method; how its recipe (8×A100, ZeRO-3, arXiv 2401.01335v3 §5.1) runs.

    deepspeed --num_gpus 8 spin.py --model zephyr-7b-sft-full             # one node
    deepspeed --hostfile hosts spin.py --model zephyr-7b-sft-full          # several nodes
    torchrun --nproc_per_node 8 spin.py --model zephyr-7b-sft-full --deepspeed configs/ds_zero3.json
    python spin.py --model zephyr-7b-sft-full     # with several GPUs visible: relaunches itself as the first line

Each rank samples its shard of the prompts (prompt i goes to rank i % world) with a full
inference copy of the opponent, and scores its shard of the training pairs; rank 0 merges the
shards in prompt order. Then the policy trains under ZeRO-3 and rank 0 writes the consolidated
weights as a Hugging Face model directory. Without --deepspeed and with one process, every
function here is a no-op and deepspeed is never imported.
"""
import json
import os
import shutil
from pathlib import Path

import torch


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (deepspeed, torchrun); (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def relaunch_command(argv: list[str], num_gpus: int) -> list[str] | None:
    """`python spin.py ...` on a machine with several GPUs and --deepspeed becomes
    `deepspeed --num_gpus N spin.py ...`, so that the user's command works as written."""
    if num_gpus < 2 or "RANK" in os.environ:
        return None
    return ["deepspeed", "--num_gpus", str(num_gpus), *argv]


def print0(*values, **kwargs) -> None:
    """print, on rank 0 only: one log for the whole job (the launcher's environment gives the rank)."""
    if world()[0] == 0:
        print(*values, **kwargs)


def bars_off(args) -> bool | None:
    """tqdm's disable: off with --quiet and on every rank but 0; None lets tqdm turn them off when
    stderr is not a terminal."""
    return True if args.quiet or args.rank != 0 else None


def setup(args) -> None:
    """Join the process group when launched with several ranks (args.rank, args.world_size come
    from the same environment, read by cli.parse_args)."""
    if args.deepspeed:
        import deepspeed

        if "RANK" not in os.environ:  # `python spin.py --deepspeed ...` on one device: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
        # nccl on GPUs, gloo or ccl on DeepSpeed's CPU accelerator. Evaluation runs on rank 0 while the
        # others wait in a barrier: lm-eval on a 7B model can outlast the default 30-minute timeout.
        from datetime import timedelta

        deepspeed.init_distributed(timeout=timedelta(hours=8 if args.eval_tasks else 1))


def barrier(args) -> None:
    if args.world_size > 1:
        torch.distributed.barrier()


def all_gather(args, items: list) -> list:
    """Every rank's list, concatenated in rank order (a Python object per rank: small lists only)."""
    if args.world_size == 1:
        return items
    gathered = [None] * args.world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def any_rank(args, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a collective: every rank must call it)."""
    if args.world_size == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device(args))
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def all_sum(args, values: list[float]) -> list[float]:
    if args.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device(args))
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def device(args) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def deepspeed_config(args) -> dict:
    """The JSON of --deepspeed with its "auto" values filled from the flags: one source of truth."""
    config = json.loads(Path(args.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "gradient_clipping": args.max_grad_norm}
    for key, value in fill.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = bool(args.bf16)
    return config


class Plain:
    """One process, plain PyTorch: the optimizer steps the model itself.

    The few operations a training step needs, the same for both backends (spin.train):
    backward(loss, last), clip() -> gradient norm, update(), save_state / load_state (the step to
    continue from, 0 with nothing saved), save_model."""

    applies_before_check = False  # clip() only measures and clips; update() applies the step

    def __init__(self, model, optimizer, args):
        self.policy, self.optimizer, self.max_grad_norm = model, optimizer, args.max_grad_norm

    def backward(self, loss, last: bool) -> None:
        loss.backward()

    def clip(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm).item()

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, path: Path, scheduler, step: int) -> None:
        import checkpoint

        checkpoint.save_training_state(path, self.policy, self.optimizer, scheduler, step)

    def load_state(self, path: Path, scheduler) -> int:
        """The step a stopped run saved its state at (every --save_steps), or 0 with nothing saved."""
        import checkpoint

        saved = checkpoint.saved_state(path)
        return checkpoint.load_training_state(saved, self.policy, self.optimizer, scheduler) if saved else 0

    def save_model(self, tokenizer, path: Path, args) -> None:
        import checkpoint

        checkpoint.save_model(self.policy, tokenizer, path)


class Zero3:
    """DeepSpeed ZeRO-3: the engine partitions weights, gradients and optimizer state over the ranks
    and steps the optimizer on each rank's partition."""

    applies_before_check = True  # DeepSpeed's engine.step() clips and applies in one call

    def __init__(self, model, optimizer, args):
        import deepspeed

        self.policy, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(args))
        self.policy.checkpoint_engine = safe_checkpoint_engine()
        self.rank, self.args = args.rank, args

    def backward(self, loss, last: bool) -> None:
        self.policy.set_gradient_accumulation_boundary(last)  # gradients are reduced at the step's last micro-batch
        self.policy.backward(loss, scale_wrt_gas=False)  # the loss is already the step's mean share

    def clip(self) -> float:
        self.policy.step()  # clips to --max_grad_norm and steps RMSProp on this rank's partition
        return float(self.policy.get_global_grad_norm())

    def update(self) -> None:
        pass  # done by engine.step() in clip()

    def save_state(self, path: Path, scheduler, step: int) -> None:
        """Every rank writes its own partition (fp32 weights, RMSProp state) with DeepSpeed's checkpoint
        code into path.tmp; then rank 0 swaps the whole directory in. The scheduler, the step and the
        RNG travel as DeepSpeed's client state."""
        import checkpoint

        tmp = path.with_name(path.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.args)
        self.policy.save_checkpoint(str(tmp), tag=STATE_TAG, save_latest=False, client_state={
            "step": step, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()})
        barrier(self.args)  # every rank's files are written
        if self.rank == 0:
            checkpoint.replace_dir(tmp, path)
        barrier(self.args)

    def load_state(self, path: Path, scheduler) -> int:
        """Each rank reads its own partition's files (never another rank's), unpickling no code."""
        import checkpoint

        saved = checkpoint.saved_state(path)
        if saved is None:
            return 0
        _, client = self.policy.load_checkpoint(str(saved), tag=STATE_TAG, load_lr_scheduler_states=False)
        scheduler.load_state_dict(client["scheduler"])
        torch.set_rng_state(client["rng"])
        return client["step"]

    def save_model(self, tokenizer, path: Path, args) -> None:
        """Every rank joins the gather of the partitioned weights; rank 0 writes them."""
        import checkpoint

        # stage3_gather_16bit_weights_on_model_save: the full weights in their training dtype, on rank 0
        state_dict = self.policy._zero3_consolidated_16bit_state_dict()  # the call Accelerate's get_state_dict makes
        if self.rank == 0:
            checkpoint.save_model(self.policy.module, tokenizer, path, state_dict=state_dict)
        barrier(args)


STATE_TAG = "state"  # iter{t}/checkpoint/state/: DeepSpeed's files of each rank


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, except that loading executes no code from the files: a
    run directory may come from elsewhere. torch.load(weights_only=True) reads tensors, containers
    and numbers, plus the three DeepSpeed types its ZeRO-3 optimizer files hold (an enum and the loss
    scalers, which are plain numbers). Saving uses torch's zip format, which weights_only reads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class WeightsOnly(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            torch.save(state_dict, path)

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnly()


def trainer(model, optimizer, args) -> Plain | Zero3:
    """The training backend, chosen once: ZeRO-3 with --deepspeed, plain PyTorch without."""
    return Zero3(model, optimizer, args) if args.deepspeed else Plain(model, optimizer, args)


def exit_if_relaunched(argv: list[str]) -> None:
    command = relaunch_command(argv, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if command:
        print("relaunching over all GPUs:", " ".join(command), flush=True)
        os.execvp(command[0], command)
