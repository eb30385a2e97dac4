"""The flags of spin.py, in the groups --help shows them; generate.py takes the model, data,
generation and precision flags from here too (parsing, recipes and validation: cli.py).

Each flag's default= is what a run takes without it and without a recipe; a recipe (--model NAME,
recipes.py), a --config file, the launcher's environment and the command line override it, in
that order (cli.resolve). --help shows each default as the run would take it, the recipe's
included: `python spin.py --model zephyr-7b-sft-full --help`.
"""
import argparse
import json

from machinery.recipes import RECIPES

TRACKERS = ("tensorboard", "wandb", "trackio")  # --report_to: report.Tracker writes to each


def shown(value) -> str:
    """A setting as it is typed on the command line (lists space-separated, on/off for switches)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == []:
        return "none"
    if value == "":
        return '""'
    if isinstance(value, list):
        return " ".join(shown(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with the value a run takes without it, and, when that value is not
    flags.py's own, where it comes from: "(default: 3, recipe toy)"."""

    def _get_help_string(self, action):
        # older Pythons' BooleanOptionalAction appends this itself
        text = (action.help or "").replace(" (default: %(default)s)", "")
        if action.default is argparse.SUPPRESS or action.required or not action.option_strings:
            return text
        source = getattr(action, "source", "default")  # set by cli.resolve
        where = "" if source == "default" else f", {source}"
        return text + f" (default: {shown(action.default)}{where})".replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with every default in --help, and errors as one line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def json_object(text: str) -> dict:
    """--chat_template_kwargs: a JSON object, or one line saying why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like "
                                         f"'{{\"enable_thinking\": false}}', got {text!r}")
    return value


def parser() -> ArgumentParser:
    """spin.py's command line, in the groups --help shows."""
    p = ArgumentParser(description="SPIN, Self-Play Fine-Tuning (arXiv 2401.01335): Algorithm 1, "
                                   "all iterations")
    add_run_flags(p)
    add_model_flags(p)
    add_data_flags(p)
    add_training_flags(p)
    add_generation_flags(p)
    add_optimization_flags(p)
    add_scale_flags(p)
    add_peft_flags(p)
    add_reporting_flags(p)
    return p


def generate_parser() -> ArgumentParser:
    """generate.py's command line: spin.py's model, data, generation and precision flags, with
    their defaults and recipes, --out, and generate.py's earlier names for three of them."""
    p = ArgumentParser(description="Sample one response y' per prompt from a model, with spin.py's "
                                   "flags, defaults and recipes.")
    add_model_flags(p)
    add_data_flags(p)
    add_generation_flags(p)
    add_precision_flags(p.add_argument_group("precision"))
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the .jsonl to write: per prompt the conversation, the real y, the "
                        "generated y' (text and ids) and whether it ended on a stop id")
    old = p.add_argument_group("generate.py's earlier names, still accepted")
    old.add_argument("--data", dest="dataset", metavar="NAME", default=argparse.SUPPRESS,
                     help="the old name of --dataset")
    old.add_argument("--split", dest="dataset_split", metavar="SPLIT", default=argparse.SUPPRESS,
                     help="the old name of --dataset_split")
    old.add_argument("--batch_size", dest="generation_batch_size", type=int, metavar="N",
                     default=argparse.SUPPRESS, help="the old name of --generation_batch_size")
    return p


def add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration and the run directory")
    g.add_argument("--config", metavar="FILE", default=None,
                   help="YAML or JSON of flag names and values (a run's config.json too): it "
                        "overrides the recipe, flags on the command line override it; a key set "
                        "to null is not set")
    g.add_argument("--print_config", action="store_true", default=False,
                   help="print every setting, its value and where it came from (default, recipe, "
                        "config file, command line, launcher environment, derived), then exit: "
                        "nothing is loaded or written")
    g.add_argument("--output_dir", metavar="DIR", default=None,
                   help="the run directory; the same command again resumes it; none: "
                        "runs/<recipe or model name>")
    g.add_argument("--overwrite_output_dir", action="store_true", default=False,
                   help="start over in an existing run directory instead of resuming it")
    g.add_argument("--save_steps", type=int, metavar="N", default=500,
                   help="save the training state every N optimizer steps")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model_name_or_path", metavar="NAME", default="toy",
                   help=f"a recipe ({', '.join(RECIPES)}): a model and the settings it is trained "
                        f"with (machinery/recipes.py); or a model directory, .gguf file or hub id")
    g.add_argument("--model_revision", metavar="REV", default=None,  # none: the hub's main branch
                   help="hub commit, branch or tag of --model (zephyr recipes: the paper's)")
    g.add_argument("--gguf_file", metavar="FILE", default=None,
                   help="a GGUF file in the --model directory or hub repository (dequantized once)")
    g.add_argument("--trust_remote_code", action="store_true", default=False,
                   help="run Python code shipped with a hub model")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", "--dataset_name", metavar="NAME", default=None,
                   help="'toy', 'chitchat', a local .jsonl/.json/.parquet file, or a hub data set "
                        "name; required when --model is not a recipe")
    g.add_argument("--dataset_split", "--dataset_train_split", metavar="SPLIT", default="train",
                   help="split of a hub data set")
    g.add_argument("--dataset_config", metavar="NAME", default=None,
                   help="configuration (subset) of a hub data set, as load_dataset's second "
                        "argument")
    g.add_argument("--dataset_revision", metavar="REV", default=None,
                   help="hub commit, branch or tag of --dataset and a same-named --eval_dataset")
    g.add_argument("--max_samples", type=int, metavar="N", default=None,
                   help="number of prompts, drawn with --seed and kept in order; none: all")
    g.add_argument("--seed", type=int, default=42,
                   help="every random draw: the prompts --max_samples keeps, y' sampling, the "
                        "order of training pairs")
    g.add_argument("--turn", choices=["first", "last"], default="first",
                   help="which assistant reply of a conversation is the human response (paper: "
                        "first)")
    g.add_argument("--system_prompt", metavar="TEXT", default=None,  # none: rendered as they are
                   help="insert a system turn with this text (\"\" for an empty one) before "
                        "conversations that have none (zephyr-7b-sft-full was trained with \"\")")
    g.add_argument("--chat_template_kwargs", type=json_object, metavar="JSON", default=None,
                   help="keyword arguments for the chat template, e.g. '{\"enable_thinking\": "
                        "false}' (Qwen3)")
    g.add_argument("--max_prompt_length", type=int, metavar="N", default=512,
                   help="prompt tokens, cut from the left (the end, where the reply starts, is "
                        "kept)")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SPIN")
    g.add_argument("--iters", type=int, metavar="T", default=4,
                   help="self-play iterations T (paper: 4)")
    g.add_argument("--beta", type=float, default=0.1,
                   help="λ in the paper: the regularization of Eq. 4.7 (paper: 0.1)")
    g.add_argument("--loss_type", choices=["logistic", "sigmoid", "hinge"], default="logistic",
                   help="ℓ in Eq. 4.7 (sigmoid: TRL's name for logistic)")
    g.add_argument("--mix_previous_iteration", action=argparse.BooleanOptionalAction, default=True,
                   help="iteration t ≥ 1 also trains on the pairs generated at t−1 (paper: yes)")
    # off: random optimizer steps, as the paper's
    g.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=False,
                   help="each optimizer step takes pairs of similar length "
                        "(batching.grouped_by_length): less padding where --padding_free cannot "
                        "pack")
    g.add_argument("--padding_free", action=argparse.BooleanOptionalAction, default=True,
                   help="pack each forward's sequences into rows without padding (batching.pack; "
                        "models in logps.PADDING_FREE_MODELS, any attention implementation)")
    g.add_argument("--fast_logps", action=argparse.BooleanOptionalAction, default=True,
                   help="log p(y|x) through the fast path (machinery/logps.py: the LM head on "
                        "response positions only, fused with the log-softmax, packed rows); "
                        "--no-fast_logps: loss.sequence_logps on the model's logits of padded "
                        "rows, the code a reader reads")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (y' ~ p_θt, the opponent's samples)")
    g.add_argument("--max_new_tokens", type=int, metavar="N", default=256,
                   help="the longest y' in tokens; a reply cut there is recorded as not ended")
    g.add_argument("--temperature", type=float, default=1.0,  # the official vLLM path samples
                   help="sampling temperature (1: y' ~ p_θt itself)")
    g.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: only the most likely tokens that hold this much "
                        "probability (1: the whole distribution)")
    g.add_argument("--greedy", action="store_true", default=False,
                   help="argmax decoding instead of sampling")
    g.add_argument("--generation_batch_size", type=int, metavar="N", default=64,
                   help="prompts sampled together (grouped by length, left-padded)")


def add_precision_flags(g) -> None:
    """--bf16 and --attn_implementation: how the model computes, in training and in generation
    (generate.py takes them too)."""
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bfloat16 autocast: sampling, log-probs and training")
    g.add_argument("--attn_implementation", metavar="NAME", default=None,
                   help="eager, sdpa or flash_attention_2; none: transformers' choice (the "
                        "zephyr recipes ask for flash_attention_2 and take sdpa where it cannot "
                        "run)")


def add_optimization_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization (Hugging Face names)")
    g.add_argument("--learning_rate", type=float, nargs="+", metavar="LR",
                   default=[5e-7, 5e-7, 1e-7, 1e-7],  # the paper's
                   help="one per iteration; the last one repeats")
    g.add_argument("--num_train_epochs", type=int, metavar="N", default=2,
                   help="passes over an iteration's pairs (paper: 2)")
    g.add_argument("--per_device_train_batch_size", type=int, metavar="N", default=8,
                   help="pairs per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=int, metavar="N", default=1,
                   help="forward passes per optimizer step on each process (set from "
                        "--global_batch_size when that is given and this is not)")
    g.add_argument("--global_batch_size", type=int, metavar="N", default=None,
                   help="pairs per optimizer step over all GPUs; sets "
                        "--gradient_accumulation_steps for the number of GPUs (paper: 64)")
    g.add_argument("--warmup_ratio", type=float, default=0.1,
                   help="the share of an iteration's optimizer steps that warm the learning rate "
                        "up linearly; it then decays linearly")
    # Hugging Face Trainer's default, which the official code runs under
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="the gradient is clipped to this norm")
    g.add_argument("--max_length", type=int, metavar="N", default=1024,
                   help="prompt + response tokens")


def add_scale_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale")
    add_precision_flags(g)
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="recompute activations in the backward pass: less memory, more time")
    g.add_argument("--deepspeed", metavar="FILE", default=None,
                   help="a DeepSpeed config, e.g. configs/ds_zero3.json (ZeRO-3 over every GPU)")
    g.add_argument("--deterministic", action="store_true", default=False,
                   help="deterministic CUDA kernels: a resumed run ends bit for bit as an "
                        "uninterrupted one on GPUs too, at a cost in speed (CPU runs are always)")
    # the deepspeed launcher adds it
    g.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)


def add_peft_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("low-rank adapters (TRL's ModelConfig names; machinery/adapters.py)")
    g.add_argument("--use_peft", action=argparse.BooleanOptionalAction, default=False,
                   help="train LoRA adapters on a frozen base instead of every weight; θ_t is the "
                        "base plus iteration t's adapter, carried to the next")
    g.add_argument("--lora_r", type=int, metavar="R", default=16, help="the adapters' rank")
    g.add_argument("--lora_alpha", type=int, default=32,
                   help="the adapters' scale is lora_alpha / lora_r")
    g.add_argument("--lora_dropout", type=float, default=0.0,
                   help="accepted for TRL's scripts; SPIN turns every dropout off (the first loss "
                        "must be log 2), this one included")
    g.add_argument("--lora_target_modules", nargs="+", metavar="NAME", default=["all-linear"],
                   help="module names the adapters wrap (all-linear: every linear layer but the "
                        "head)")
    g.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=False,
                   help="QLoRA: the frozen base in 4 bits (bitsandbytes); needs --use_peft")
    g.add_argument("--load_in_8bit", action=argparse.BooleanOptionalAction, default=False,
                   help="the frozen base in 8 bits; needs --use_peft")
    g.add_argument("--bnb_4bit_quant_type", choices=["nf4", "fp4"], default="nf4",
                   help="the 4-bit data type")
    g.add_argument("--use_bnb_nested_quant", action=argparse.BooleanOptionalAction, default=False,
                   help="quantize the 4-bit scales too")


def add_reporting_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and logging (evaluation.py, report.py, plot.py)")
    # none: the toy's test split, or rows taken out of --dataset
    g.add_argument("--eval_dataset", metavar="NAME", default=None,
                   help="held-out prompts: a data set like --dataset; none: the toy's test split, "
                        "otherwise --eval_samples rows, at most a tenth, taken out of --dataset")
    g.add_argument("--eval_split", metavar="SPLIT", default="test", help="split of --eval_dataset")
    g.add_argument("--eval_samples", type=int, metavar="N", default=200,
                   help="held-out prompts evaluated after every iteration; 0: none")
    g.add_argument("--eval_tasks", type=lambda s: [t for t in s.split(",") if t], default=None,
                   metavar="TASKS", help="lm-evaluation-harness tasks run on the models "
                                         "--eval_models names, comma-separated (pip install -r "
                                         "requirements-eval.txt); paper: the paper's evaluation "
                                         "(evals/paper.py, docs/evaluation.md); none: no tasks")
    g.add_argument("--eval_models", type=lambda s: [m for m in s.split(",") if m],
                   default=["all"], metavar="MODELS",
                   help="which models --eval_tasks evaluates, comma-separated: all, start (θ_0), "
                        "last (θ_iters), or numbers s (θ_s, made by iteration s-1); the paper's "
                        "tasks are long on a 7B model")
    g.add_argument("--eval_limit", type=int, metavar="N", default=None,
                   help="at most this many examples per --eval_tasks task; none: all")
    g.add_argument("--eval_include_path", metavar="DIR", default=None,
                   help="a directory of lm-eval task YAML files (evals/ is always included)")
    g.add_argument("--report_to", nargs="+", choices=["none", "all", *TRACKERS], default=["none"],
                   help="also log every step's and evaluation's numbers to these, on one step axis "
                        "(report.py): tensorboard (<output_dir>/tensorboard), wandb "
                        "(WANDB_MODE=offline: files in <output_dir>/wandb), trackio (a local "
                        "database in TRACKIO_DIR); several at once, or all")
    g.add_argument("--push_to_hub", action="store_true", default=False,
                   help="upload every iteration's model, card and the run's plot to --hub_model_id "
                        "when the iteration completes (hub.py); checked before any work")
    g.add_argument("--hub_model_id", metavar="ORG/NAME", default=None,
                   help="the Hub repository for --push_to_hub; none: the --output_dir name")
    g.add_argument("--hub_private_repo", action="store_true", default=False,
                   help="create the --hub_model_id repository private")
    g.add_argument("--plot", metavar="RUN_DIR", default=None,
                   help="only redraw RUN_DIR/spin.png from a run directory, then exit")
    g.add_argument("--quiet", action="store_true", default=False, help="no progress bars")
