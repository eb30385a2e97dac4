"""Launched by tests/test_zero3.py under `deepspeed --num_gpus 2` (DS_ACCELERATOR=cpu): trains a
few ZeRO-3 steps with spin.train, saves with distributed.save_model, then gathers the partitioned
parameters and compares them with the saved safetensors file. Writes the comparison as JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import distributed  # noqa: E402
import spin  # noqa: E402
import toy  # noqa: E402

model_dir, out = sys.argv[-2], Path(sys.argv[-1])
args = spin.parse_args(["--model", model_dir, "--dataset", "toy", "--deepspeed", "configs/ds_zero3.json",
                        "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--learning_rate", "1e-4",
                        "--beta", "1", "--max_length", "48", "--max_prompt_length", "32", "--quiet",
                        "--output_dir", str(out.parent / "run")])
distributed.setup(args)
tokenizer, model = models.load_model(model_dir)
rows = toy.make_rows("train")[:24]  # 3 steps of a global batch of 8
pairs = [{"iteration": 0, "id": r["id"], "prompt_ids": data.ChatFormat(tokenizer).prompt_ids(r["messages"]),
          "real_ids": data.ChatFormat(tokenizer).reply_ids(r["messages"], r["response"]),
          "generated_ids": data.ChatFormat(tokenizer).reply_ids(r["messages"], "1+1=2")} for r in rows]
spin.opponent_logps(model, pairs, args)
it = out.parent / "iter"
it.mkdir(exist_ok=True)
history, trainer = spin.train(model, pairs, 1e-4, 0, args, it)
trainer.save_model(tokenizer, out.parent / "model", args)
params = dict(trainer.policy.module.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values())):
    if args.rank == 0:
        saved = load_file(out.parent / "model" / "model.safetensors")
        diff = max((saved[name] - p.detach()).abs().max().item() for name, p in params.items())
        out.write_text(json.dumps({"steps": len(history), "max_abs_diff": diff, "names": sorted(params) == sorted(saved),
                                   "losses": [h["loss"] for h in history]}))
