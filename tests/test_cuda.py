"""The CUDA path. Part one: what a read of torch's and DeepSpeed's source found wrong there, checked
on the CPU. Where only a GPU could show a fault (the device an object collective uses, DeepSpeed's
accelerator), a stand-in for torch.cuda / DeepSpeed's accelerator records what the code asks of them:
acceptable only because the machines that run this suite have no GPU. Part two: checks that need a
GPU, skipped without one; `python -m benchmarks.smoke` runs them on a GPU (SPIN_TESTS_CUDA=1)."""
import argparse
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
from machinery import batching
from machinery import distributed
import generate
from machinery import logps
from conftest import tiny_mistral
from loss import sequence_logps

CUDA = torch.cuda.is_available()


def namespace(**values):
    return argparse.Namespace(**{"deepspeed": None, "eval_tasks": None, "push_to_hub": False, "deterministic": False,
                                 **values})


class Accelerator:
    """Stand-in for DeepSpeed's accelerator object: only the name of its devices."""

    def __init__(self, name):
        self.name = name

    def device_name(self, index=None):
        return self.name


@pytest.fixture
def eight_gpus_rank_3(monkeypatch):
    """Rank 3 of 8 on a machine with 8 GPUs, as torch.cuda and DeepSpeed would present it; records the
    calls that matter, in order."""
    import deepspeed
    import deepspeed.accelerator

    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator("cuda"))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(("init_distributed", kw)))
    return calls


def test_each_rank_makes_its_gpu_current_before_joining_the_group(eight_gpus_rank_3):
    """torch moves an object collective's bytes to torch.cuda.current_device(): without set_device it is
    cuda:0 on every rank, and the first all_gather_object (checkpoint.agreed) fails on ranks 1..7."""
    distributed.setup(namespace(deepspeed="configs/ds_zero3.json"))
    assert [name for name, _ in eight_gpus_rank_3] == ["set_device", "init_distributed"]
    assert eight_gpus_rank_3[0][1] == torch.device("cuda", 3)


def test_the_group_waits_long_where_rank_0_works_alone(eight_gpus_rank_3):
    """lm-eval on a 7B model and a Hub upload run on rank 0 while the others wait in a barrier."""
    for flags, hours in (({}, 1), ({"eval_tasks": ["arc_easy"]}, 8), ({"push_to_hub": True}, 8)):
        eight_gpus_rank_3.clear()
        distributed.setup(namespace(deepspeed="configs/ds_zero3.json", **flags))
        assert eight_gpus_rank_3[-1][1]["timeout"].total_seconds() == hours * 3600


def test_under_deepspeed_the_device_is_deepspeeds_accelerator(monkeypatch):
    """CPU ranks (DS_ACCELERATOR=cpu, as the tests launch them) on a machine that has GPUs stay on the CPU;
    without --deepspeed one process takes the GPU when there is one."""
    import deepspeed.accelerator

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator("cpu"))
    assert distributed.device(namespace(deepspeed="configs/ds_zero3.json")) == torch.device("cpu")
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator("cuda"))
    assert distributed.device(namespace(deepspeed="configs/ds_zero3.json")) == torch.device("cuda", 1)
    assert distributed.device(namespace()) == torch.device("cuda", 0)


def test_deterministic_turns_on_deterministic_kernels(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    try:
        distributed.setup(namespace(deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's reproducible workspace
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"  # transformers passes it to flash-attn
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_top_p_sampling_is_refused_and_greedy_or_top_p_1_is_not(tmp_path):
    """transformers' top-p warper runs torch.cumsum, which raises under deterministic algorithms on CUDA:
    refused before anything is written (tests/test_bad_input.py), where no cumsum runs it is allowed."""
    from machinery.cli import UsageError, parse_args

    base = ["--model", str(tmp_path / "model"), "--dataset", "toy", "--output_dir", str(tmp_path / "run"),
            "--deterministic"]
    assert parse_args(base + ["--top_p", "0.9", "--greedy"]).deterministic
    assert parse_args(base).top_p == 1.0
    with pytest.raises(UsageError, match="torch.cumsum"):
        parse_args(base + ["--top_p", "0.9"])


def test_the_relaunch_is_torchrun_from_this_interpreter(monkeypatch):
    """No `deepspeed` looked up on PATH (FileNotFoundError outside an activated venv), and no launcher
    that rewrites CUDA_VISIBLE_DEVICES: the interpreter running spin.py runs torch's own launcher."""
    monkeypatch.delenv("RANK", raising=False)
    argv = ["spin.py", "--model", "zephyr-7b-sft-full"]
    assert distributed.relaunch_command(argv, 4) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", *argv]


@pytest.mark.slow
def test_the_relaunched_ranks_use_exactly_the_visible_gpus(tmp_path, monkeypatch):
    """CUDA_VISIBLE_DEVICES=6,3, the command relaunch_command builds, run for real: each rank sees 6,3, and
    its device cuda:LOCAL_RANK (distributed.device) is physical GPU 6 on rank 0 and 3 on rank 1. DeepSpeed's
    launcher with --num_gpus 2 would have deleted the variable and taken GPUs 0 and 1. The ranks here are
    a script that prints what the launcher gave it (no GPU on this machine; a few seconds)."""
    monkeypatch.delenv("RANK", raising=False)
    probe = tmp_path / "rank.py"
    probe.write_text("import os\nprint(os.environ['RANK'], os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], "
                     "os.environ.get('CUDA_VISIBLE_DEVICES'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run(distributed.relaunch_command([str(probe)], 2), env={**env, "CUDA_VISIBLE_DEVICES": "6,3"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = sorted(line.split() for line in result.stdout.splitlines())
    assert ranks == [["0", "0", "2", "6,3"], ["1", "1", "2", "6,3"]]
    assert [visible.split(",")[int(local)] for _, local, _, visible in ranks] == ["6", "3"]


def test_several_gpus_without_deepspeed_say_so_in_one_line(monkeypatch):
    """The plain path is one process: `python spin.py` on a node of 8 trains on one GPU, and says so."""
    monkeypatch.delenv("RANK", raising=False)
    note = distributed.one_gpu_note(None, 8)
    assert note.count("\n") == 0 and "8 GPUs are visible" in note and "--deepspeed configs/ds_zero3.json" in note
    assert distributed.one_gpu_note("configs/ds_zero3.json", 8) is None  # relaunched instead
    assert distributed.one_gpu_note(None, 1) is None
    monkeypatch.setenv("RANK", "0")
    assert distributed.one_gpu_note(None, 8) is None  # launched: several ranks without --deepspeed are refused


def test_a_cpu_build_of_torch_beside_an_nvidia_driver_says_so_in_one_line(tmp_path):
    driver = tmp_path / "version"  # what /proc/driver/nvidia/version is on a machine with the driver
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15\n")
    note = distributed.cpu_build_note(None, driver, nvidia_smi=None)
    assert note.count("\n") == 0 and str(driver) in note and "is a CPU build" in note
    assert distributed.cpu_build_note(None, tmp_path / "absent", nvidia_smi="/usr/bin/nvidia-smi") is not None
    assert distributed.cpu_build_note("12.8", driver, nvidia_smi=None) is None  # a CUDA build
    assert distributed.cpu_build_note(None, tmp_path / "absent", nvidia_smi=None) is None  # no driver


def test_a_flash_attn_that_cannot_run_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch,
                                                                                        capsys):
    """A flash-attn wheel built for another torch fails at import with an undefined symbol; transformers
    checks only the package's metadata. Here a real package that fails the same way, on sys.path, and
    torch.cuda.is_available standing in for the GPU that FlashAttention-2 needs."""
    import spin

    package = tmp_path / "site" / "flash_attn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise ImportError("flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: '
                                         'undefined symbol: _ZN3c104cuda9SetDeviceEab")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = tmp_path / "run"
    code = spin.cli(["--model", str(tmp_path / "model"), "--dataset", "toy", "--output_dir", str(run), "--bf16",
                     "--attn_implementation", "flash_attention_2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --attn_implementation flash_attention_2: flash-attn fails") and \
        "undefined symbol" in err[0]
    assert not run.exists()


def test_under_bf16_the_kv_cache_holds_bf16_keys_and_values(tokenizer):
    """float32 weights under bf16 autocast (the plain --bf16 path): RoPE's cos/sin took the float32 hidden
    states' dtype and promoted q and k, so the cache held float32 keys beside bf16 values, 1.5× its size.
    Sampling now runs bf16 hidden states, as bf16 weights do. Device-independent dtype rules; on CPU."""
    model = tiny_mistral(tokenizer)
    caches = []
    handle = model.register_forward_hook(lambda module, inputs, out: caches.append(out.cache))
    try:
        generate.generate(model, tokenizer, [[5, 7, 31, 24], [5, 7]], generate.Sampling(max_new_tokens=3, bf16=True),
                          seed=0, stop=[2])
    finally:
        handle.remove()
    layers = caches[-1].layers
    assert len(layers) == 2 and {(layer.keys.dtype, layer.values.dtype) for layer in layers} == {(torch.bfloat16,) * 2}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights themselves are untouched


class Ops(TorchDispatchMode):
    """Records every aten op that runs, with the dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self.seen.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))


def fused_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(16, 5000, bias=False).to(dtype)  # one tile: 40 positions × 5000 entries
    targets = torch.randint(0, 5000, (40,), generator=g)
    return hidden, head, targets


def test_the_fused_head_multiplies_in_autocasts_dtype_in_backward_too():
    """Backward runs outside autocast: the fused head's backward matmuls ran in float32 on the plain bf16
    path (float32 weights under autocast), at a fraction of the tensor cores' bf16 rate."""
    hidden, head, targets = fused_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logps.FusedTokenLogps.apply(hidden, head.weight, None, targets, head)
    with Ops() as ops:
        out.sum().backward()
    matmuls = [dtypes for name, dtypes in ops.seen if name in ("mm", "addmm", "bmm", "matmul", "linear")]
    assert len(matmuls) == 3  # the tile's logits again, dL/dhidden, dL/dweight
    assert all(dtypes == [torch.bfloat16] * len(dtypes) for dtypes in matmuls), matmuls
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


def test_the_fused_head_never_waits_for_the_device():
    """.nonzero() (the targets in a vocabulary block) copies to the host and waits for the GPU, once per
    tile; masks do the same work without waiting. Values: float64 against the textbook definition."""
    hidden, head, targets = fused_inputs(torch.float64)
    with Ops() as ops:
        out = logps.FusedTokenLogps.apply(hidden, head.weight, None, targets, head)
        out.sum().backward()
    names = {name for name, _ in ops.seen}
    assert not names & {"nonzero", "item", "_local_scalar_dense", "masked_select"}, names
    reference = torch.log_softmax(hidden.detach() @ head.weight.detach().t(), -1).gather(1, targets[:, None])[:, 0]
    # float64 inside, float32 out (log-probs are always returned in float32): its rounding near -9 is ~1e-6
    assert torch.allclose(out.detach().double(), reference, atol=1e-5)


def test_flash_attention_gets_its_varlen_arguments_computed_once_on_the_host():
    """What transformers would compute from the position ids in every layer, with a device-to-host copy
    each time; here once per batch, from the same position ids: the same numbers."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    sequences = [data.build_sequence(list(range(3, 3 + p)), list(range(40, 40 + r)), 64, 128)
                 for p, r in ((5, 7), (12, 3), (2, 2), (9, 30))]
    batch = batching.pack(sequences, width=sum(len(s["input_ids"]) for s in sequences))
    ours = batching.varlen_kwargs(batch["position_ids"])
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(ours["cu_seq_lens_q"], cu_q) and torch.equal(ours["cu_seq_lens_k"], cu_k)
    assert ours["max_length_q"] == int(max_q) == ours["max_length_k"] == int(max_k) == 39
    assert isinstance(ours["max_length_q"], int)  # flash-attn wants a Python int, not a tensor


def test_sampling_under_bf16_multiplies_in_bf16(tokenizer):
    """generate(bf16=True): the opponent samples in bf16 as training computes; before, a plain --bf16 run
    sampled in float32 (twice the memory, float32 speed, and flash-attn refuses float32)."""
    model = tiny_mistral(tokenizer)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    try:
        generate.generate(model, tokenizer, [[5, 7, 31, 24]], generate.Sampling(max_new_tokens=3, bf16=True), seed=0, stop=[2])
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}


# --- Part two: on a GPU ---------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (benchmarks/smoke.py runs these on one)")
# bf16 keeps 8 bits of mantissa: a log-prob near -50 summed over ~40 tokens is good to about 0.1-0.3.
BF16_LOGP_TOLERANCE = 0.5


@needs_cuda
def test_on_cuda_the_fast_path_gives_the_definitions_log_probs_in_bf16(tokenizer):
    model = tiny_mistral(tokenizer, hidden=64).cuda()
    prompts = [[5, 7, 31, 24, 19, 32, 29, 2, 7, 6, 7], [5, 7, 30, 2, 7, 6, 7]]
    replies = [[32, 29, 19, 31, 24, 37, 25, 27, 29, 2], [33, 2]]
    for padding_free in (False, True):
        fast, _ = logps.score(model, prompts, replies, logps.Scoring(32, 48, bf16=True, padding_free=padding_free))
        batch = data.collate([data.build_sequence(p, r, 32, 48) for p, r in zip(prompts, replies)])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda()).logits
        plain = sequence_logps(logits.float(), batch["labels"].cuda())
        assert torch.allclose(fast.float(), plain, atol=BF16_LOGP_TOLERANCE), (fast, plain)


@needs_cuda
def test_on_cuda_the_first_loss_is_log_2_to_bf16_rounding(tokenizer):
    """The opponent pass and a training step score the same pairs in other batches: other shapes, other
    bf16 rounding; the first loss is log 2 within what that rounding moves a margin (λ = 1 here)."""
    import spin

    model = tiny_mistral(tokenizer, hidden=64).cuda()
    pairs = [{"prompt_ids": [5, 7, 31, 24, 2, 7, 6, 7], "real_ids": [32, 29, 2], "generated_ids": [33, 29, 27, 2]},
             {"prompt_ids": [5, 7, 30, 2, 7, 6, 7], "real_ids": [33, 2], "generated_ids": [33, 30, 2]}]
    args = argparse.Namespace(per_device_train_batch_size=1, max_prompt_length=32, max_length=48, bf16=True,
                              quiet=True, rank=0, padding_free=True,
                              fast_logps=True)
    spin.opponent_logps(model, pairs, args)
    real, generated = spin.pair_logps(model, pairs, spin.Scoring.of_run(args))
    from loss import spin_loss

    losses, _, _ = spin_loss(real, generated, torch.tensor([p["opponent_real_logp"] for p in pairs]).cuda(),
                             torch.tensor([p["opponent_generated_logp"] for p in pairs]).cuda(), beta=1.0)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=BF16_LOGP_TOLERANCE)
