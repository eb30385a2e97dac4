"""The command line of spin.py: parsing (config files, the launchers' environment), recipe
resolution and validation; the flags themselves are defined in flags.py.

Flags use the names Hugging Face users know (--learning_rate, --per_device_train_batch_size, ...).
Every flag defaults to None so that "given" can be told from "not given": DEFAULTS, then the
recipe named by --model (recipes.py), then the flags given, win in that order. Bad values are
refused here, before anything is loaded or written, with one line naming the flag.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

from machinery import distributed, flags
from machinery.flags import TRACKERS
from machinery.recipes import DEFAULTS, RECIPES



class UsageError(ValueError):
    """A bad flag or model: shown as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = flags.parser()
    p.set_defaults(**config_file(p, argv))
    args = p.parse_args(argv)
    # one name in config.json
    args.loss_type = "logistic" if args.loss_type == "sigmoid" else args.loss_type
    args.report_to = trackers(args.report_to)
    from_accelerate_launch(args)
    apply_recipe(args)
    validate(args)
    return args


def trackers(names) -> list[str]:
    """--report_to as config.json keeps it: the trackers, in TRACKERS' order ("none" alone: [])."""
    names = [names] if isinstance(names, str) else list(names)  # a config file may give one name
    unknown = [n for n in names if n not in ("none", "all", *TRACKERS)]
    if unknown:
        raise UsageError(f"--report_to: unknown tracker {unknown[0]!r} (choose from "
                         f"{', '.join(TRACKERS)}, all, none)")
    return [t for t in TRACKERS if t in names or "all" in names]


DERIVED = {"recipe", "world_size"}  # in a run's config.json, recomputed rather than read
NOT_CONFIG = {"rank", "local_rank", "plot", "config"}  # never written to config.json


def pairs_per_step(args) -> int:
    """The global batch: pairs per optimizer step over all ranks (the paper's 64)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def run_config(args) -> dict:
    """What a run's config.json records: every setting that says what the run computes."""
    return {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}


def run_main(main, argv=None) -> int:
    """main(argv) as a command: bad input turned into one line on stderr and exit status 2, a
    diverged run into status 1, a run stopped by a signal with its state saved into
    EXIT_RESUMABLE (75)."""
    from machinery import checkpoint, preemption
    from machinery.adapters import AdapterError
    from machinery.models import ModelError
    from machinery.steps import TrainingDiverged
    import data

    preemption.install()
    try:
        main(argv)
    except (UsageError, ModelError, AdapterError, data.DataError, checkpoint.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except preemption.Stopped as e:
        if distributed.world()[0] == 0:  # every rank stops; one says so
            print(e, file=sys.stderr)
        return preemption.EXIT_RESUMABLE
    finally:
        # for callers in the same process (tests); a process's exit releases it anyway
        checkpoint.unlock()
        preemption.reset()
    return 0


def config_file(parser: argparse.ArgumentParser, argv) -> dict:
    """The values of --config FILE (YAML or JSON, flag names as keys), as the parser's defaults, so
    that flags given on the command line still win. Unknown keys are refused by name."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return {}
    import yaml  # a dependency of transformers

    try:
        text = Path(path).read_text(encoding="utf-8")
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    actions = {name.lstrip("-"): a for a in parser._actions if a.dest not in ("help", "config")
               # aliases too (model_name_or_path)
               for name in a.option_strings if not name.startswith("--no-")}
    given, values = values, {}
    for key in given.keys() - DERIVED:
        if key not in actions:
            raise UsageError(f"--config {path}: unknown key {key!r} (keys are flag names, e.g. "
                             f"learning_rate)")
        action, value = actions[key], given[key]
        key = action.dest
        if action.nargs in ("+", "*") and not isinstance(value, list):
            value = [value]  # learning_rate: 5e-7, one value for every iteration
        convert = action.type or (lambda v: v)
        try:  # strings as the command line would give them ("5e-7" is a string in YAML)
            values[key] = [convert(v) if isinstance(v, str) else v
                           for v in value] if isinstance(value, list) else \
                convert(value) if isinstance(value, str) else value
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"--config {path}: {key}: {e}") from None
        # report_to: a list, maybe empty
        chosen = values[key] if isinstance(values[key], list) else [values[key]]
        if action.choices and any(v not in action.choices for v in chosen):
            raise UsageError(f"--config {path}: {key} must be one of {', '.join(action.choices)}, "
                             f"got {value!r}")
    return values


def apply_recipe(args) -> None:
    """Every flag not given takes the recipe's value (--model NAME), else the default."""
    recipe = RECIPES.get(args.model, {})
    accumulation_given = args.gradient_accumulation_steps is not None
    wants_flash = recipe.get("attn_implementation") == "flash_attention_2"
    if args.attn_implementation is None and wants_flash and not flash_attention_available():
        # the recipe's choice where it can run; asked for by name, it is refused
        args.attn_implementation = "sdpa"
    for key, value in {**DEFAULTS, **recipe}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.recipe = args.model if recipe else None
    args.model = recipe.get("model", args.model)
    args.output_dir = args.output_dir or os.path.join("runs", args.recipe or Path(args.model).name
                                                      or "model")
    args.rank, args.world_size = distributed.world()
    # the paper's 64 pairs, on any number of GPUs
    if args.global_batch_size and not accumulation_given:
        per_step = args.per_device_train_batch_size * args.world_size
        args.gradient_accumulation_steps = max(1, args.global_batch_size // per_step)


def flash_attention_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def from_accelerate_launch(args) -> None:
    """`accelerate launch --config_file CONFIG spin.py ...` (how alignment-handbook and the
    official SPIN code launch): its DeepSpeed settings stand for --deepspeed and its bf16 for
    --bf16, unless given. Accelerate passes them in the environment; this project runs its own
    ZeRO-3 loop with them."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return
    if args.bf16 is None and os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16":
        args.bf16 = True
    if args.deepspeed is None:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            args.deepspeed = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        elif stage == "3":
            args.deepspeed = str(Path(__file__).resolve().parents[1] / "configs" / "ds_zero3.json")
        else:
            raise UsageError(f"accelerate launch with DeepSpeed ZeRO stage {stage}: SPIN's recipe "
                             f"trains with ZeRO-3; set zero_stage: 3 or deepspeed_config_file in "
                             f"the accelerate config, or pass --deepspeed")


def validate(args) -> None:
    checks = [
        (args.iters >= 1, "--iters must be at least 1"),
        (args.seed >= 0, "--seed must be 0 or more"),
        (args.beta > 0, "--beta (λ) must be positive"),
        (all(lr > 0 for lr in args.learning_rate), "--learning_rate values must be positive"),
        (args.num_train_epochs >= 1, "--num_train_epochs must be at least 1"),
        (args.per_device_train_batch_size >= 1, "--per_device_train_batch_size must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (not args.global_batch_size or args.global_batch_size == pairs_per_step(args),
         f"--global_batch_size {args.global_batch_size} is not --per_device_train_batch_size "
         f"{args.per_device_train_batch_size} × --gradient_accumulation_steps "
         f"{args.gradient_accumulation_steps} × {args.world_size} processes"),
        (0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.max_grad_norm > 0, "--max_grad_norm must be positive"),
        (args.max_prompt_length >= 1, "--max_prompt_length must be at least 1"),
        (args.max_length > args.max_prompt_length,
         "--max_length must exceed --max_prompt_length, or no response token fits"),
        (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
        (args.temperature > 0, "--temperature must be positive (use --greedy for argmax decoding)"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.generation_batch_size >= 1, "--generation_batch_size must be at least 1"),
        (args.max_samples is None or args.max_samples >= 1, "--max_samples must be at least 1"),
        (args.save_steps >= 1, "--save_steps must be at least 1"),
        (args.eval_samples >= 0, "--eval_samples must be 0 (no held-out evaluation) or more"),
        (args.eval_limit is None or args.eval_limit >= 1, "--eval_limit must be at least 1"),
        (args.eval_tasks is None or len(args.eval_tasks) > 0,
         "--eval_tasks needs at least one task name"),
        (args.eval_include_path is None or Path(args.eval_include_path).is_dir(),
         f"--eval_include_path {args.eval_include_path}: no such directory"),
        (args.dataset is not None, f"--dataset is required with --model {args.model} (not a "
                                   f"recipe)"),
        (args.deepspeed is None or Path(args.deepspeed).is_file(),
         f"--deepspeed {args.deepspeed}: no such file"),
        (args.world_size == 1 or args.deepspeed, f"{args.world_size} processes were launched "
                                                 f"without --deepspeed; pass --deepspeed "
                                                 f"configs/ds_zero3.json"),
        (args.attn_implementation in (None, "eager", "sdpa", "flash_attention_2"),
         "--attn_implementation must be eager, sdpa or flash_attention_2"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    check_packages(args)
    check_cuda_path(args)
    if args.deepspeed:
        check_deepspeed_precision(args)
    check_adapters(args)


def check_packages(args) -> None:
    """Optional packages the flags need, and FlashAttention-2's conditions."""
    import importlib.util

    for flag, given, package in (("--eval_tasks", args.eval_tasks, "lm_eval"),
                                 *((f"--report_to {t}", t in args.report_to, t) for t in TRACKERS)):
        if given and importlib.util.find_spec(package) is None:
            raise UsageError(f"{flag} needs the {package} package: pip install -r "
                             f"requirements-eval.txt")
    if args.attn_implementation == "flash_attention_2":
        # flash-attn kernels take fp16/bf16 only; transformers passes float32 on unchanged
        if not args.bf16:
            raise UsageError("--attn_implementation flash_attention_2 needs --bf16 "
                             "(FlashAttention-2 has no float32 kernels); or use sdpa")
        if not torch.cuda.is_available():
            raise UsageError("--attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa "
                             "on this machine")
        if importlib.util.find_spec("flash_attn") is None:
            raise UsageError("--attn_implementation flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation); or use sdpa")


def check_adapters(args) -> None:
    """The combinations of adapter flags that cannot run, refused before anything is loaded."""
    import importlib.util

    quantized = args.load_in_4bit or args.load_in_8bit
    checks = [
        (not quantized or args.use_peft, f"--load_in_{4 if args.load_in_4bit else 8}bit needs "
                                         f"--use_peft: a quantized base is frozen, only adapters "
                                         f"train"),
        (not (args.load_in_4bit and args.load_in_8bit),
         "--load_in_4bit and --load_in_8bit: choose one"),
        (args.lora_r >= 1, "--lora_r must be at least 1"),
        # Never run: quantized storage under ZeRO-3 needs a GPU (below) and a GPU session to test
        # it; refused rather than shipped untried.
        (not (quantized and args.deepspeed), "--load_in_4bit/--load_in_8bit with --deepspeed is "
                                             "not supported: QLoRA trains on one GPU; LoRA "
                                             "(--use_peft alone) scales with ZeRO-3"),
        # Measured with bitsandbytes 0.50.2 on a CPU (2026-11-30): after one step, the adapters
        # whose gradient passes through a frozen 4-bit layer (gate, up, v) had not moved; torch
        # warns that its gemv_4bit op has no autograd kernel. Training there would silently be
        # wrong.
        (not (quantized and not torch.cuda.is_available()),
         "--load_in_4bit/--load_in_8bit on a CPU: bitsandbytes' CPU kernels pass no gradient "
         "through the frozen quantized layers, so most adapters would not learn; QLoRA needs a "
         "CUDA GPU"),
        (not args.use_peft or importlib.util.find_spec("peft") is not None,
         "--use_peft needs the peft package: pip install -r requirements.txt"),
        (not quantized or importlib.util.find_spec("bitsandbytes") is not None,
         "--load_in_4bit/--load_in_8bit need the bitsandbytes package: pip install bitsandbytes"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def check_deepspeed_precision(args) -> None:
    """A --deepspeed config that fixes its precision must agree with --bf16 (the one switch):
    else the engine would keep weights in one dtype while autocast and the opponent copy use
    another."""
    try:
        config = json.loads(Path(args.deepspeed).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--deepspeed {args.deepspeed}: not a readable JSON file ({e})") from None
    if config.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise UsageError(f"--deepspeed {args.deepspeed}: fp16 is enabled; SPIN trains in bf16 "
                         f"(--bf16) or float32: set \"fp16\": {{\"enabled\": false}}")
    bf16 = config.get("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != bool(args.bf16):
        raise UsageError(f"--deepspeed {args.deepspeed} sets bf16 "
                         f"enabled={str(bool(bf16)).lower()} but --bf16 is "
                         f"{'on' if args.bf16 else 'off'}: pass "
                         f"{'--bf16' if bf16 else '--no-bf16'}, or set \"enabled\": \"auto\" in "
                         f"the config")


def check_cuda_path(args) -> None:
    """What would fail on a GPU only after the model has loaded and the run directory exists,
    refused in one line before: --deterministic with top-p sampling, and a FlashAttention-2
    that is installed but cannot run here."""
    if args.deterministic and not args.greedy and args.top_p < 1:
        # transformers' top-p warper sums the sorted probabilities with torch.cumsum
        # (generation/logits_process.py), which torch.use_deterministic_algorithms refuses on
        # CUDA for floats (torch's docstring lists it); the same rule on every device
        raise UsageError(f"--deterministic with --top_p {args.top_p}: top-p sampling runs "
                         f"torch.cumsum, which has no deterministic CUDA kernel; use --top_p 1 "
                         f"(the recipes' value) or leave out --deterministic")
    if args.attn_implementation == "flash_attention_2":
        fault = flash_attention_fault()
        if fault:
            raise UsageError(f"--attn_implementation flash_attention_2: flash-attn fails on this "
                             f"machine ({fault}); reinstall it for torch {torch.__version__} "
                             f"(pip install flash-attn --no-build-isolation) or pass "
                             f"--attn_implementation sdpa")


def flash_attention_fault() -> str | None:
    """FlashAttention-2 run once, forward and backward, on a tiny bf16 input on this rank's GPU:
    None where it runs, else the first line of what it raised. transformers checks only the
    package's metadata, so a wheel built for another torch (an undefined symbol at import) or
    without kernels for this GPU would fail inside the first attention call instead."""
    try:
        from flash_attn import flash_attn_func

        device = torch.device("cuda", distributed.local_rank())
        q, k, v = (torch.randn(1, 4, 2, 64, dtype=torch.bfloat16, device=device,
                               requires_grad=True) for _ in range(3))  # (B, T, heads, head dim)
        flash_attn_func(q, k, v, causal=True).sum().backward()
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - whatever it raises, a run could not use it
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None
