"""The command line of spin.py: parsing (config files, the launchers' environment), recipe
resolution and validation; the flags themselves, with their defaults, are defined in flags.py.

Flags use the names Hugging Face users know (--learning_rate, --per_device_train_batch_size, ...).
Every setting is resolved one way (resolve): the first of the command line, the --config file,
the launcher's environment, the recipe named by --model (recipes.py) and the flag's default
(flags.py) that sets it wins; a few values are then derived from others (derive).
`--print_config` shows each value and where it came from. Bad values are refused here, before
anything is loaded or written, with one line naming the flag.
"""
import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from machinery import distributed, flags
from machinery.flags import TRACKERS
from machinery.recipes import RECIPES



class UsageError(ValueError):
    """A bad flag or model: shown as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    """spin.py's settings: resolved, derived, checked. With --print_config they are printed with
    where each came from, and the program exits (status 0, or 2 with the check that failed)."""
    args, sources = resolve(flags.parser(), argv, derive=derive)
    if args.print_config:
        print(describe(run_config(args), sources))
    validate(args)
    if args.print_config:  # like --help: nothing is loaded or written
        raise SystemExit(0)
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
NOT_CONFIG = {"rank", "local_rank", "plot", "config", "print_config"}  # never in config.json


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


UNSET = object()  # a flag the command line did not give (argparse fills no default over it)


def resolve(parser: argparse.ArgumentParser, argv=None, launcher: bool = True,
            derive=None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Every setting of `parser`'s flags, each from the first that sets it of: the command line,
    --config FILE, the launcher's environment (launcher=True), the recipe that --model names, the
    flag's default; then derive(args, sources), if given, computes the values that follow from
    others. Returns the settings and where each came from ({name: source}); a recipe's name becomes
    its model (args.recipe keeps the name). --help shows every flag's default as a run of this
    command line without that flag would take it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    early = early_flags(parser, argv, ("config", "model", "deepspeed"))
    actions = [a for a in parser._actions if a.default is not argparse.SUPPRESS]
    layers = [("default", {a.dest: a.default for a in actions})]
    config = config_file(parser, early["config"]) if early.get("config") else {}
    name = early.get("model") or config.get("model") or layers[0][1]["model"]
    recipe = {k: v for k, v in RECIPES.get(name, {}).items() if k in layers[0][1] and k != "model"}
    layers.append((f"recipe {name}", recipe))
    if launcher:
        given_elsewhere = early.get("deepspeed") is not None or "deepspeed" in config
        layers.append(("launcher environment", launcher_environment(given_elsewhere)))
    layers.append((f"config file {early.get('config')}", config))
    # what --help shows: each flag's value in a run of this command line without that flag
    without_model = merged(layers)
    shown, shown_from = settings(*merged([*layers, ("command line", {"model": name})]), derive)
    for action in actions:
        values, sources = without_model if action.dest == "model" else (vars(shown), shown_from)
        action.default, action.source = values[action.dest], sources[action.dest]
    return settings(*merged([*layers, ("command line", command_line(parser, argv))]), derive)


def settings(values: dict, sources: dict[str, str],
             derive=None) -> tuple[argparse.Namespace, dict[str, str]]:
    """The merged values as a run's settings: a recipe's name replaced by its model, then the
    derived values."""
    args = argparse.Namespace(**copy.deepcopy(values))  # no list shared with a recipe
    if args.model in RECIPES:
        args.recipe, args.model = args.model, RECIPES[args.model]["model"]
        sources["recipe"], sources["model"] = sources["model"], f"recipe {args.recipe}"
    else:
        args.recipe, sources["recipe"] = None, "derived"
    if derive:
        derive(args, sources)
    return args, sources


def merged(layers: list[tuple[str, dict]]) -> tuple[dict, dict[str, str]]:
    """The layers' values, each later layer over the earlier ones, and the layer each came from."""
    values, sources = {}, {}
    for source, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, source))
    return values, sources


def early_flags(parser: argparse.ArgumentParser, argv: list[str], names) -> dict:
    """A few flags as the command line gives them, read before the full parse (the recipe, config
    file and launcher settings that --help shows depend on them); None where not given."""
    pre = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.dest in names and action.option_strings:
            pre.add_argument(*action.option_strings, dest=action.dest, default=None)
    return vars(pre.parse_known_args(argv)[0])


def command_line(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flags the command line gives, {name: value}: parsed over a namespace in which every
    flag is UNSET, so that argparse fills in no default (--help prints and exits here)."""
    unset = argparse.Namespace(**{a.dest: UNSET for a in parser._actions})
    return {k: v for k, v in vars(parser.parse_args(argv, unset)).items() if v is not UNSET}


def config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    """The values of --config FILE (YAML or JSON, flag names as keys), {name: value}; a key set to
    null is left out (not set). Unknown keys are refused by name."""
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
        if value is None:
            continue
        key = action.dest
        if action.nargs in ("+", "*") and not isinstance(value, list):
            value = [value]  # learning_rate: 5e-7, one value for every iteration
        convert = action.type or (lambda v: v)
        try:  # strings as the command line would give them ("5e-7" is a string in YAML)
            if action.nargs in ("+", "*"):
                values[key] = [convert(v) if isinstance(v, str) else v for v in value]
            else:  # a list here is already parsed (eval_tasks as config.json records it)
                values[key] = convert(value) if isinstance(value, str) else value
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise UsageError(f"--config {path}: {key}: {e}") from None
        # report_to: a list, maybe empty
        chosen = values[key] if isinstance(values[key], list) else [values[key]]
        if action.choices and any(v not in action.choices for v in chosen):
            raise UsageError(f"--config {path}: {key} must be one of {', '.join(action.choices)}, "
                             f"got {value!r}")
    return values


def derive(args, sources: dict[str, str]) -> None:
    """The settings spin.py computes from others: one name per loss and tracker, the run
    directory's name, the number of processes, the accumulation that keeps --global_batch_size,
    and sdpa where the recipe's FlashAttention-2 cannot run."""
    args.loss_type = "logistic" if args.loss_type == "sigmoid" else args.loss_type  # one name
    args.report_to = trackers(args.report_to)
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.recipe or Path(args.model).name or "model")
        sources["output_dir"] = "derived"
    args.rank, args.world_size = distributed.world()
    sources["world_size"] = "launcher environment" if "WORLD_SIZE" in os.environ else "default"
    # the paper's 64 pairs, on any number of GPUs
    if args.global_batch_size and sources["gradient_accumulation_steps"] == "default":
        per_step = args.per_device_train_batch_size * args.world_size
        args.gradient_accumulation_steps = max(1, args.global_batch_size // per_step)
        sources["gradient_accumulation_steps"] = "derived"
    attention_fallback(args, sources)


def attention_fallback(args, sources: dict[str, str]) -> None:
    """A recipe's FlashAttention-2 where it can run, else sdpa; asked for by name (command line,
    config file), it is refused where it cannot run (check_packages)."""
    from_recipe = sources["attn_implementation"].startswith("recipe")
    if args.attn_implementation == "flash_attention_2" and from_recipe and \
            not flash_attention_available():
        args.attn_implementation, sources["attn_implementation"] = "sdpa", "derived"


def describe(settings: dict, sources: dict[str, str]) -> str:
    """--print_config: each setting, its value as config.json records it, and where it came from
    (default, recipe NAME, config file FILE, command line, launcher environment, derived)."""
    values = {k: json.dumps(v, ensure_ascii=False) for k, v in settings.items()}
    name_width = max(map(len, values))
    value_width = min(40, max(map(len, values.values())))
    return "\n".join(f"{k:<{name_width}}  {v:<{value_width}}  {sources.get(k, 'derived')}"
                     for k, v in values.items())


def flash_attention_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def launcher_environment(deepspeed_given: bool) -> dict:
    """`accelerate launch --config_file CONFIG spin.py ...` (how alignment-handbook and the
    official SPIN code launch): its DeepSpeed settings stand for --deepspeed and its bf16 for
    --bf16. Accelerate passes them in the environment; this project runs its own ZeRO-3 loop with
    them."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return {}
    settings = {"bf16": True} if os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" else {}
    if deepspeed_given:  # --deepspeed on the command line or in --config wins
        return settings
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        settings["deepspeed"] = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    elif stage == "3":
        settings["deepspeed"] = str(Path(__file__).resolve().parents[1] / "configs" /
                                    "ds_zero3.json")
    else:
        raise UsageError(f"accelerate launch with DeepSpeed ZeRO stage {stage}: SPIN's recipe "
                         f"trains with ZeRO-3; set zero_stage: 3 or deepspeed_config_file in "
                         f"the accelerate config, or pass --deepspeed")
    return settings


def validate(args) -> None:
    check_generation(args)
    checks = [
        (args.iters >= 1, "--iters must be at least 1"),
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
        (args.max_length > args.max_prompt_length,
         "--max_length must exceed --max_prompt_length, or no response token fits"),
        (args.save_steps >= 1, "--save_steps must be at least 1"),
        (args.eval_samples >= 0, "--eval_samples must be 0 (no held-out evaluation) or more"),
        (args.eval_limit is None or args.eval_limit >= 1, "--eval_limit must be at least 1"),
        (args.eval_tasks is None or len(args.eval_tasks) > 0,
         "--eval_tasks needs at least one task name"),
        (len(args.eval_models) > 0 and all(m in ("all", "start", "last") or m.isdigit()
                                           and int(m) <= args.iters for m in args.eval_models),
         f"--eval_models {','.join(args.eval_models)}: all, start, last or model numbers 0.."
         f"{args.iters} (θ_s is made by iteration s-1), comma-separated"),
        (args.eval_include_path is None or Path(args.eval_include_path).is_dir(),
         f"--eval_include_path {args.eval_include_path}: no such directory"),
        (args.deepspeed is None or Path(args.deepspeed).is_file(),
         f"--deepspeed {args.deepspeed}: no such file"),
        (args.world_size == 1 or args.deepspeed, f"{args.world_size} processes were launched "
                                                 f"without --deepspeed; pass --deepspeed "
                                                 f"configs/ds_zero3.json"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    check_packages(args)
    check_cuda_path(args)
    if args.deepspeed:
        check_deepspeed_precision(args)
    check_adapters(args)


def check_generation(args) -> None:
    """The flags spin.py and generate.py share: the model, the data and how y' is sampled."""
    checks = [
        (args.seed >= 0, "--seed must be 0 or more"),
        (args.max_prompt_length >= 1, "--max_prompt_length must be at least 1"),
        (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
        (args.temperature > 0, "--temperature must be positive (use --greedy for argmax decoding)"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.generation_batch_size >= 1, "--generation_batch_size must be at least 1"),
        (args.max_samples is None or args.max_samples >= 1, "--max_samples must be at least 1"),
        (args.dataset is not None, f"--dataset is required with --model {args.model} (not a "
                                   f"recipe)"),
        (args.attn_implementation in (None, "eager", "sdpa", "flash_attention_2"),
         "--attn_implementation must be eager, sdpa or flash_attention_2"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


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
