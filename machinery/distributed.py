"""Several processes: sharded generation and DeepSpeed ZeRO-3 training. Not part of the paper's
method; how its recipe (8×A100, ZeRO-3, arXiv 2401.01335v3 §5.1) runs.

    deepspeed --num_gpus 8 spin.py --model zephyr-7b-sft-full             # one node
    deepspeed --hostfile hosts spin.py --model zephyr-7b-sft-full          # several nodes
    torchrun --nproc_per_node 8 spin.py --model zephyr-7b-sft-full --deepspeed configs/ds_zero3.json
    python spin.py --model zephyr-7b-sft-full     # several GPUs visible: relaunches under torchrun

Each rank samples its shard of the prompts (prompt i goes to rank i % world) with a full
inference copy of the opponent, and scores its shard of the training pairs; the shards meet through
the process group (all_gather), in prompt order. Then the policy trains under ZeRO-3
(backends.py) and the consolidated weights are written as a Hugging Face model directory.

Several nodes need no shared disk: find_shared_disk() tells whether --output_dir is one directory
that every rank sees, or a copy on each node's disk. In the first case rank 0 writes every file; in
the second each node's first rank writes what its node's ranks read back (config.json,
tokens.jsonl, synthetic.jsonl, opponent_logps.jsonl, the next opponent's model/, complete.json, the
ZeRO-3 training state of its ranks), and rank 0's copy also holds the reports (evaluation, plot,
TensorBoard). Without --deepspeed and with one process, every function here is a no-op.
"""
import math
import os
import shutil
import sys
from pathlib import Path

import torch


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (deepspeed, torchrun); (0, 1) without
    one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def several_nodes() -> bool:
    """Whether the ranks span more than one machine: torchrun and accelerate say how many ranks this
    node runs in LOCAL_WORLD_SIZE, the deepspeed launcher in LOCAL_SIZE."""
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE"))
    return local is not None and int(local) < world()[1]


_own_copies: list[bool] = []  # [True] when every node keeps its own copy of the run directory


def find_shared_disk(run: Path) -> None:
    """With several nodes, find out whether --output_dir is one shared directory or a copy on each
    node's own disk: rank 0 writes a probe file into its directory and every rank looks for it in
    its own. Creates the directory (on rank 0). Sets what writer() answers for the rest of the run.
    (A probe left by a kill is ignored by checkpoint.RunDir.)"""
    _own_copies.clear()
    if not several_nodes():
        return
    import uuid

    probe = f".probe-{uuid.uuid4().hex}" if world()[0] == 0 else None
    barrier()  # every rank has looked at its directory before the probe appears
    if world()[0] == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / probe).write_text("")
    seen = all_gather([(run / broadcast(probe)).exists()])
    barrier()
    if world()[0] == 0:
        (run / probe).unlink()
    _own_copies.append(not all(seen))


def writer() -> bool:
    """Whether this rank writes the run directory's files: rank 0 when every rank sees the same
    directory (one node, or a shared file system), else each node's first rank into its own copy."""
    return local_rank() == 0 if _own_copies == [True] else world()[0] == 0


def broadcast(value):
    """Rank 0's value, on every rank (a Python object)."""
    if not _several():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def relaunch_command(argv: list[str], num_gpus: int,
                     executable: str = sys.executable) -> list[str] | None:
    """`python spin.py --deepspeed ...` with N > 1 GPUs visible becomes one process per visible GPU,
    `python -m torch.distributed.run --standalone --nproc_per_node N spin.py ...` (torchrun), run by
    the interpreter that runs this one (no launcher looked up on PATH), so that the user's command
    works as written. torchrun leaves CUDA_VISIBLE_DEVICES as it is: with 4,5,6,7 the ranks see
    those GPUs as cuda:0..3 and rank r takes cuda:LOCAL_RANK (device), physical GPU 4 + r. (The
    deepspeed launcher does not: given --num_gpus N it deletes CUDA_VISIBLE_DEVICES and takes GPUs
    0..N-1, and given nothing it turns the variable into --include localhost:4,5,6,7, which it
    parses as integers only (deepspeed/launcher/runner.py, 0.19.8): GPU UUIDs fail.) --standalone
    rendezvouses on a free port, so that two runs on one shared node do not meet on port 29500."""
    if num_gpus < 2 or "RANK" in os.environ:
        return None
    return [executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(num_gpus), *argv]


def one_gpu_note(deepspeed: str | None, num_gpus: int) -> str | None:
    """One line where `python spin.py` without --deepspeed sees several GPUs: it trains on one (the
    plain path is one process; several ranks need ZeRO-3's config, so it does not relaunch)."""
    if deepspeed or num_gpus < 2 or "RANK" in os.environ:
        return None
    return (f"note: {num_gpus} GPUs are visible and this run uses one (cuda:0): pass --deepspeed "
            f"configs/ds_zero3.json to train on all {num_gpus} (ZeRO-3)")


def cpu_build_note(cuda_build: str | None, driver: Path = Path("/proc/driver/nvidia/version"),
                   nvidia_smi: str | None = shutil.which("nvidia-smi")) -> str | None:
    """One line where the machine has an NVIDIA driver (its /proc file, or nvidia-smi on PATH) but
    torch is a CPU build (torch.version.cuda is None), which would run everything on the CPU
    without a word: `pip install` of a CPU wheel over a CUDA build does exactly that."""
    if cuda_build is not None or not (driver.exists() or nvidia_smi):
        return None
    found = driver if driver.exists() else nvidia_smi
    return (f"note: this machine has an NVIDIA driver ({found}) but torch {torch.__version__} is a "
            f"CPU build, so everything runs on the CPU: install a CUDA build of torch to use it")


def print0(*values, **kwargs) -> None:
    """print, on rank 0 only: one log for the whole job (the launcher's environment gives the
    rank)."""
    if world()[0] == 0:
        print(*values, **kwargs)


def bars_off(quiet: bool) -> bool | None:
    """tqdm's disable: off with --quiet and on every rank but 0; None lets tqdm turn them off when
    stderr is not a terminal."""
    return True if quiet or world()[0] != 0 else None


def start(args, relaunch: bool) -> None:
    """The ranks of a run, before anything else: `python spin.py --deepspeed ...` with several GPUs
    visible relaunches itself over them (relaunch: called as a command); without --deepspeed it
    says in one line that it uses one; every rank takes its device and joins the group (setup).
    Also one line where the machine has an NVIDIA driver that torch cannot use."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for note in (cpu_build_note(torch.version.cuda), one_gpu_note(args.deepspeed, gpus)):
        if note:
            print0(note, flush=True)
    if args.deepspeed and relaunch:
        exit_if_relaunched(sys.argv)
    setup(args)


def shard(n: int) -> list[int]:
    """This rank's share of n items: items rank, rank + world, rank + 2·world, ..."""
    rank, size = world()
    return list(range(rank, n, size))


def micro_batches(step_pairs: list, size: int) -> list[tuple[list, float]]:
    """This rank's micro-batches of one optimizer step (its shard, `size` pairs each), with each
    one's weight: the factor that turns its loss sum into its share of the step's mean over all
    ranks. Every rank runs the same number (ZeRO-3 gathers weights in each forward, a
    collective): a rank short of pairs in the last step runs one pair with weight 0."""
    rank, ranks = world()
    mine = step_pairs[rank::ranks]
    count = math.ceil(math.ceil(len(step_pairs) / ranks) / size)
    out = []
    for k in range(count):
        batch = mine[k * size:(k + 1) * size]
        out.append((batch, ranks / len(step_pairs)) if batch else (step_pairs[:1], 0.0))
    return out


def setup(args) -> None:
    """Join the process group when launched with several ranks (args.rank, args.world_size come
    from the same environment, read by cli.parse_args).

    On CUDA this rank's GPU becomes the current device FIRST: the first collectives are object
    collectives (checkpoint.agreed's all_gather_object), and torch moves their pickled bytes to
    torch.cuda.current_device(), which is cuda:0 on every rank unless set ("it is the user's
    responsibility ... via torch.cuda.set_device()", torch's all_gather_object docstring), while
    deepspeed.init_distributed binds the NCCL group to cuda:LOCAL_RANK and sets the current device
    only later, in deepspeed.initialize. Without it every rank but 0 fails at start-up."""
    if args.deepspeed:
        import deepspeed

        # `python spin.py --deepspeed ...` on one device: a group of one
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    if getattr(args, "deterministic", False):
        deterministic()
    here = device(args)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    if args.deepspeed:
        # nccl on GPUs, gloo or ccl on DeepSpeed's CPU accelerator. Rank 0 alone evaluates (lm-eval
        # on a 7B model) and uploads (--push_to_hub) while the others wait in a barrier: either can
        # outlast the default 30-minute timeout.
        from datetime import timedelta

        long_wait = args.eval_tasks or getattr(args, "push_to_hub", False)
        deepspeed.init_distributed(timeout=timedelta(hours=8 if long_wait else 1))


def deterministic() -> None:
    """--deterministic: the same numbers from the same inputs on CUDA too, at a cost in speed
    (docs/scaling.md). On CPU every kernel this project runs is deterministic already. cuBLAS
    needs a fixed workspace (set before its first use), torch's deterministic kernels replace the
    atomic ones (index_add, scatter_add, ...) and refuse any op that has none, and FlashAttention-2
    runs its deterministic backward (transformers reads FLASH_ATTENTION_DETERMINISTIC)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def teardown() -> None:
    """Leave the process group together at the end of a run: every rank waits for the others, then
    destroys it. Ranks that just exit leave their gloo/NCCL connections to the interpreter's
    exit, and a rank whose peer has already gone can abort there ("terminate called without an
    active exception": seen once, in a test of two torchrun nodes on CPU, after the run had
    completed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _several() -> bool:
    """Whether this process is one of several ranks in a process group (collectives need no
    arguments: the group knows its size)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _here() -> torch.device:
    """Where the group's tensors live: NCCL's on this rank's current GPU (set by setup), gloo's
    on the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _several():
        torch.distributed.barrier()


def all_gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (a Python object per rank: small lists
    only)."""
    if not _several():
        return items
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (a collective: every rank must call
    it)."""
    if not _several():
        return flag
    tensor = torch.tensor([float(flag)], device=_here())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def all_sum(values: list[float]) -> list[float]:
    if not _several():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_here())
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def device(args) -> torch.device:
    """This rank's device. Under --deepspeed, DeepSpeed's accelerator decides (DS_ACCELERATOR=cpu
    runs CPU ranks on a machine that has GPUs too, as the tests do): cuda:LOCAL_RANK or the CPU.
    Without it (one process): the GPU when there is one."""
    if args.deepspeed:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        return torch.device(name, local_rank()) if name == "cuda" else torch.device(name)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def exit_if_relaunched(argv: list[str]) -> None:
    """Replace this process by the launcher of one rank per visible GPU (relaunch_command)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    command = relaunch_command(argv, gpus)
    if command:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        which = f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""
        print(f"relaunching over the {gpus} visible GPUs{which}:", " ".join(command), flush=True)
        os.execv(command[0], command)
