"""Launched by tests/test_zero3.py under `deepspeed --num_gpus 2` (DS_ACCELERATOR=cpu): trains a
few ZeRO-3 steps with spin.train, saves with distributed.save_model, then gathers the partitioned
parameters and compares them with the saved safetensors file. Then one backward of the fused head
(logps.FusedTokenLogps) under ZeRO-3, on the same batch on both ranks: the gradient that reached the
head weight's partitions, gathered, against plain autograd through the full logits of the saved
model in one process. Writes the comparisons as JSON."""
import json
import sys
from pathlib import Path


import deepspeed
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import load_file

import data
from machinery import models
from machinery import distributed
from machinery import logps
import loss
import spin

model_dir, out = sys.argv[-2], Path(sys.argv[-1])
args = spin.parse_args(["--model", model_dir, "--dataset", "toy", "--deepspeed", "configs/ds_zero3.json",
                        "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--learning_rate", "1e-4",
                        "--beta", "1", "--max_length", "48", "--max_prompt_length", "32", "--quiet",
                        "--output_dir", str(out.parent / "run")])
distributed.setup(args)
tokenizer, model = models.load_model(model_dir)
rows = data.toy_rows("train")[:24]  # 3 steps of a global batch of 8
pairs = [{"iteration": 0, "id": r["id"], "prompt_ids": data.ChatFormat(tokenizer).prompt_ids(r["messages"]),
          "real_ids": data.ChatFormat(tokenizer).reply_ids(r["messages"], r["response"]),
          "generated_ids": data.ChatFormat(tokenizer).reply_ids(r["messages"], "1+1=2")} for r in rows]
spin.opponent_logps(model, pairs, args)
it = out.parent / "iter"
it.mkdir(exist_ok=True)
history, trainer = spin.train(model, pairs, learning_rate=1e-4, iteration=0, args=args, iteration_dir=it)
trainer.save_model(tokenizer, out.parent / "model", args)
params = dict(trainer.policy.module.named_parameters())
with deepspeed.zero.GatheredParameters(list(params.values())):
    if args.rank == 0:
        saved = load_file(out.parent / "model" / "model.safetensors")
        diff = max((saved[name] - p.detach()).abs().max().item() for name, p in params.items())
        result = {"steps": len(history), "max_abs_diff": diff, "names": sorted(params) == sorted(saved),
                  "losses": [h["loss"] for h in history]}

batch = data.collate([data.build_sequence(p["prompt_ids"], p["real_ids"], 32, 48) for p in pairs[:4]])
engine = trainer.policy
assert logps.fused_head(engine)
engine.backward(-logps.batch_logps(engine, batch).sum())
head_grad = safe_get_full_grad(engine.module.get_output_embeddings().weight)  # a collective: every rank
if args.rank == 0:
    plain = models.load_model(str(out.parent / "model"))[1].train()
    spin.disable_dropout(plain)
    full_logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    (-loss.sequence_logps(full_logits, batch["labels"]).sum()).backward()
    expected = plain.get_output_embeddings().weight.grad
    result.update(head_grad_max_abs_diff=(head_grad - expected).abs().max().item(),
                  head_grad_max_abs=expected.abs().max().item())
    out.write_text(json.dumps(result))
