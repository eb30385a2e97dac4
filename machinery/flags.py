"""The flags of spin.py, in the groups --help shows them (parsing, recipes and validation:
cli.py). Every flag defaults to None so that "given" can be told from "not given"
(recipes.DEFAULTS fills the rest)."""
import argparse
import json

from machinery.recipes import RECIPES

TRACKERS = ("tensorboard", "wandb", "trackio")  # --report_to: report.Tracker writes to each


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like "
                                         f"'{{\"enable_thinking\": false}}', got {text!r}")
    return value


def parser() -> ArgumentParser:
    p = ArgumentParser(description="SPIN, Self-Play Fine-Tuning (arXiv 2401.01335): Algorithm 1, "
                                   "all iterations")
    add_data_flags(p)
    add_training_flags(p)
    add_peft_flags(p)
    add_reporting_flags(p)
    return p


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--config", metavar="FILE",
                   help="YAML or JSON of flag names and values (a run's config.json too); flags "
                        "given on the command line override it")
    g.add_argument("--model", "--model_name_or_path", default="toy",
                   help=f"recipe ({', '.join(RECIPES)}), model directory or hub id")
    g.add_argument("--dataset", "--dataset_name",
                   help="'toy', 'chitchat', a local .jsonl/.json/.parquet file, or a hub data set "
                        "name")
    g.add_argument("--dataset_split", "--dataset_train_split",
                   help="split of a hub data set (default: train)")
    g.add_argument("--dataset_config", help="configuration (subset) of a hub data set, as "
                                            "load_dataset's second argument")
    g.add_argument("--gguf_file", help="a GGUF file in the --model directory or hub repository "
                                       "(dequantized once)")
    g.add_argument("--model_revision", help="hub commit, branch or tag of --model (zephyr recipe: "
                                            "the paper's)")
    g.add_argument("--dataset_revision", help="hub commit, branch or tag of --dataset and a "
                                              "same-named --eval_dataset")
    g.add_argument("--max_samples", type=int,
                   help="number of prompts, sampled with --seed (default: all)")
    g.add_argument("--turn", choices=["first", "last"], default="first",
                   help="which assistant reply of a conversation is the human response (paper: "
                        "first)")
    g.add_argument("--system_prompt", help="insert a system turn with this text (\"\" for an empty "
                                           "one) before conversations that have none (recipe "
                                           "zephyr-7b-sft-full: \"\", as alignment-handbook "
                                           "trained it)")
    g.add_argument("--chat_template_kwargs", type=json_object, metavar="JSON",
                   help="keyword arguments for the chat template, e.g. '{\"enable_thinking\": "
                        "false}' (Qwen3)")
    g.add_argument("--output_dir", help="the run directory (default: runs/<recipe or model name>)")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an existing run directory instead of resuming it")
    g.add_argument("--save_steps", type=int, default=500,
                   help="save the training state every N optimizer steps")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="run Python code shipped with a hub model")


def add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SPIN")
    g.add_argument("--iters", type=int, help="self-play iterations T (paper: 4)")
    g.add_argument("--beta", type=float, help="λ in the paper: the regularization of Eq. 4.7 "
                                              "(paper: 0.1)")
    g.add_argument("--loss_type", choices=["logistic", "sigmoid", "hinge"], default="logistic",
                   help="ℓ in Eq. 4.7 (sigmoid: TRL's name for logistic)")
    g.add_argument("--mix_previous_iteration", action=argparse.BooleanOptionalAction, default=True,
                   help="iteration t ≥ 1 also trains on the pairs generated at t−1 (paper: yes)")
    g.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=None,
                   help="each optimizer step takes pairs of similar length "
                        "(batching.grouped_by_length): less padding where --padding_free cannot "
                        "pack; default: off (random steps, as the paper's)")
    g.add_argument("--padding_free", action=argparse.BooleanOptionalAction, default=None,
                   help="pack each forward's sequences into rows without padding (batching.pack; "
                        "models in logps.PADDING_FREE_MODELS, any attention implementation); "
                        "default: on, except in the toy recipe")
    g.add_argument("--fast_logps", action=argparse.BooleanOptionalAction, default=None,
                   help="log p(y|x) through the fast path (machinery/logps.py: the LM head on "
                        "response positions only, fused with the log-softmax, packed rows); "
                        "--no-fast_logps: loss.sequence_logps on the model's logits of padded "
                        "rows, the code a reader reads; default: on, except in the toy recipe")
    g = p.add_argument_group("generation (the opponent's samples)")
    g.add_argument("--max_new_tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top_p", type=float)
    g.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    g.add_argument("--generation_batch_size", type=int)
    g = p.add_argument_group("optimization (Hugging Face names)")
    g.add_argument("--learning_rate", type=float, nargs="+",
                   help="one per iteration; the last one repeats")
    g.add_argument("--num_train_epochs", type=int)
    g.add_argument("--per_device_train_batch_size", type=int, help="pairs per forward pass")
    g.add_argument("--gradient_accumulation_steps", type=int)
    g.add_argument("--global_batch_size", type=int,
                   help="pairs per optimizer step over all GPUs; sets "
                        "--gradient_accumulation_steps when that is not given (recipe: 64, the "
                        "paper's)")
    g.add_argument("--warmup_ratio", type=float)
    g.add_argument("--max_grad_norm", type=float)
    g.add_argument("--max_length", type=int, help="prompt + response tokens")
    g.add_argument("--max_prompt_length", type=int, help="prompt tokens, cut from the left")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("scale")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--attn_implementation", help="eager, sdpa or flash_attention_2")
    g.add_argument("--deepspeed", help="a DeepSpeed config, e.g. configs/ds_zero3.json (ZeRO-3)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels: a resumed run ends bit for bit as an "
                        "uninterrupted one on GPUs too, at a cost in speed (CPU runs are always)")
    # the deepspeed launcher adds it
    g.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)


def add_peft_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("low-rank adapters (TRL's ModelConfig names; machinery/adapters.py)")
    g.add_argument("--use_peft", action=argparse.BooleanOptionalAction, default=None,
                   help="train LoRA adapters on a frozen base instead of every weight; θ_t is the "
                        "base plus iteration t's adapter, carried to the next")
    g.add_argument("--lora_r", type=int, help="the adapters' rank (default 16)")
    g.add_argument("--lora_alpha", type=int, help="the adapters' scale is lora_alpha / lora_r "
                                                  "(default 32)")
    g.add_argument("--lora_dropout", type=float, default=0.0,
                   help="accepted for TRL's scripts; SPIN turns every dropout off (the first loss "
                        "must be log 2), this one included")
    g.add_argument("--lora_target_modules", nargs="+",
                   help="module names the adapters wrap (default: all-linear, every linear layer "
                        "but the head)")
    g.add_argument("--load_in_4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="QLoRA: the frozen base in 4 bits (bitsandbytes); needs --use_peft")
    g.add_argument("--load_in_8bit", action=argparse.BooleanOptionalAction, default=None,
                   help="the frozen base in 8 bits; needs --use_peft")
    g.add_argument("--bnb_4bit_quant_type", choices=["nf4", "fp4"], help="default nf4")
    g.add_argument("--use_bnb_nested_quant", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the 4-bit scales too")


def add_reporting_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and logging (evaluation.py, report.py, plot.py)")
    g.add_argument("--eval_dataset", help="held-out prompts: a data set like --dataset (default: "
                                          "the toy's test split; otherwise --eval_samples rows, at "
                                          "most a tenth, taken out of --dataset)")
    g.add_argument("--eval_split", help="split of --eval_dataset (default: test)")
    g.add_argument("--eval_samples", type=int,
                   help="held-out prompts evaluated after every iteration; 0: none")
    g.add_argument("--eval_tasks", type=lambda s: [t for t in s.split(",") if t],
                   help="lm-evaluation-harness tasks run on every model, comma-separated (pip "
                        "install lm_eval)")
    g.add_argument("--eval_limit", type=int, help="at most this many examples per --eval_tasks "
                                                  "task")
    g.add_argument("--eval_include_path", help="a directory of lm-eval task YAML files (evals/ is "
                                               "always included)")
    g.add_argument("--report_to", nargs="+", choices=["none", "all", *TRACKERS], default=["none"],
                   help="also log every step's and evaluation's numbers to these, on one step axis "
                        "(report.py): tensorboard (<output_dir>/tensorboard), wandb "
                        "(WANDB_MODE=offline: files in <output_dir>/wandb), trackio (a local "
                        "database in TRACKIO_DIR); several at once, or all")
    g.add_argument("--push_to_hub", action="store_true",
                   help="upload every iteration's model, card and the run's plot to --hub_model_id "
                        "when the iteration completes (hub.py); checked before any work")
    g.add_argument("--hub_model_id", help="the Hub repository for --push_to_hub (default: the "
                                          "--output_dir name)")
    g.add_argument("--hub_private_repo", action="store_true",
                   help="create the --hub_model_id repository private")
    g.add_argument("--plot", metavar="RUN_DIR",
                   help="only redraw RUN_DIR/spin.png from a run directory, then exit")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
