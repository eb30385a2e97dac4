"""SPIN with low-rank adapters (--use_peft), optionally on a base held in 4 or 8 bits (QLoRA).

The design: one adapter carried across iterations. θ_t is the frozen base plus iteration t's
adapter, saved as iter{t-1}/model (adapter_config.json names the base, adapter_model.safetensors
holds the adapter); iteration t loads exactly that, trains the same adapter further, and saves it
as iter{t}/model. Nothing is merged or re-quantized between iterations, so the saved θ_{t+1} is
the policy that was trained, and the first loss of every iteration is log 2 (the opponent's
log-probs come from the same weights). LoRA's B matrices start at zero: θ_0 is the base itself.
A merged full model, for deployment, is written at the end of a run (merge below).

    model = adapters.wrap(model, args)          # iteration 0: the base with fresh adapters
    adapters.is_adapter(path)                   # an iter{t}/model of an adapter run
    adapters.base_of(path)                      # (its base, the base's pinned hub revision)
    adapters.merge(path, out)                   # base + adapter as one plain model directory
"""
import json
from pathlib import Path

import torch


class AdapterError(ValueError):
    """An adapter setting or directory this run cannot use: one line, exit status 2."""


def quantization(args):
    """The bitsandbytes config of --load_in_4bit / --load_in_8bit, or None (a float base)."""
    if not (getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)):
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if args.bf16 else torch.float32  # the adapters' matmuls
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)


def hold_compute_dtype(model, quantization) -> None:
    """Every 4-bit layer computes in bnb_4bit_compute_dtype (bf16 under --bf16), whatever its
    inputs. The parts left unquantized are float32 (prepare_model_for_kbit_training casts them), so
    a Linear4bit's input is float32; bitsandbytes 0.45.5 takes the compute dtype from the first
    input (set_compute_type in bitsandbytes/nn/modules.py: a float32 matmul on a dequantized
    float32 copy of each weight); 0.50.2 keeps the configured one, as set here."""
    if not quantization.load_in_4bit:
        return
    import bitsandbytes

    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.compute_dtype = quantization.bnb_4bit_compute_dtype
            module.compute_type_is_set = True  # set_compute_type never runs


def wrap(model, args):
    """The base with fresh LoRA adapters on --lora_target_modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization(args) is not None:  # float32 norms, input gradients for checkpointing
        model = prepare_model_for_kbit_training(model, args.gradient_checkpointing)
    targets = args.lora_target_modules
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                        task_type="CAUSAL_LM",
                        target_modules=targets[0] if targets == ["all-linear"] else targets)
    # The base's hub revision goes into adapter_config.json ("revision"), which every later load of
    # the base reads (base_of; peft's AutoPeftModel too): without it they load the hub's `main`
    # (peft's mapping_func.py), not the --model_revision a recipe pins. A directory has none.
    revision = None if Path(model.name_or_path).exists() else args.model_revision
    try:
        return get_peft_model(model, config, revision=revision)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise AdapterError(f"--lora_target_modules {' '.join(targets)}: "
                           f"{str(e).splitlines()[0][:200]}") from None


def is_adapter(path) -> bool:
    """Whether `path` is an adapter directory (an iter{t}/model of a --use_peft run)."""
    return (Path(path) / "adapter_config.json").is_file()


def base_of(path) -> tuple[str, str | None]:
    """(base model, its hub revision) as an adapter directory names them: adapter_config.json's
    base_model_name_or_path and revision (None: a directory, or the hub's main)."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base or (base.startswith(("/", ".")) and not Path(base).exists()):
        raise AdapterError(f"--model {path}: an adapter whose base model {base!r} is missing; put "
                           f"the base there, or edit base_model_name_or_path in its "
                           f"adapter_config.json")
    return base, config.get("revision")


def attach(base_model, path):
    """θ_t: the base with the adapter of `path`, trainable (iteration t trains it further)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path), is_trainable=True)


def merge(path, out: Path, dtype=torch.float32) -> None:
    """A plain model directory equal to base + adapter (LoRA's BA added into the weights), with the
    tokenizer, for deployment; the base at the revision the adapter names, a quantized base
    merged from its float weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from machinery import checkpoint

    name, revision = base_of(path)
    revision = None if Path(name).exists() else revision  # a local directory has no revisions
    base = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype,
                                                use_safetensors=True)
    model = PeftModel.from_pretrained(base, str(path))
    checkpoint.save_model(model.merge_and_unload(), AutoTokenizer.from_pretrained(str(path)), out)
