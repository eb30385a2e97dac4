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
import sys
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


def setup(args) -> None:
    """Join the process group when launched with several ranks; sets args.rank, args.world_size."""
    args.rank, args.world_size = world()
    if args.deepspeed:
        import deepspeed

        if "RANK" not in os.environ:  # `python spin.py --deepspeed ...` on one device: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
        # nccl on GPUs, gloo or ccl on DeepSpeed's CPU accelerator. Evaluation runs on rank 0 while the
        # others wait in a barrier: lm-eval on a 7B model can outlast the default 30-minute timeout.
        from datetime import timedelta

        deepspeed.init_distributed(timeout=timedelta(hours=8 if args.eval_tasks else 1))
    if args.rank != 0:
        args.quiet = True  # one log and one set of progress bars: rank 0's
        sys.stdout = open(os.devnull, "w")


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


def wrap(model, optimizer, args):
    """The DeepSpeed engine around policy and optimizer, or None on the plain single-process path."""
    if not args.deepspeed:
        return None
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(args))
    return engine


def save_model(engine, model, tokenizer, path: Path, args) -> None:
    """θ_{t+1} as a Hugging Face directory (safetensors). Under ZeRO-3 every rank joins the gather
    of the partitioned weights, and rank 0 writes them."""
    import checkpoint

    if engine is None:
        checkpoint.save_model(model, tokenizer, path)
        return
    # stage3_gather_16bit_weights_on_model_save: the full weights in their training dtype, on rank 0
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # the call Accelerate's get_state_dict makes
    if args.rank == 0:
        checkpoint.save_model(engine.module, tokenizer, path, state_dict=state_dict)
    barrier(args)


def exit_if_relaunched(argv: list[str]) -> None:
    command = relaunch_command(argv, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if command:
        print("relaunching over all GPUs:", " ".join(command), flush=True)
        os.execvp(command[0], command)
