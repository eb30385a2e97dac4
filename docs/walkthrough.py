"""One SPIN step followed as data, on the toy: prints what docs/walkthrough.md shows.

    python -m docs.walkthrough              # the toy's weak SFT model (built on first use, ~30 s)
    python -m docs.walkthrough MODEL_DIR    # any model directory with a chat template
"""
import sys


import torch

from machinery import cli
import data
from machinery import models
import generate
import spin
from loss import spin_loss


LR = 3e-5  # small enough that each step moves the log-probs a little: a trend, not a jump


def main(model_name: str = "toy") -> None:
    args = cli.parse_args(["--model", model_name, "--dataset", "toy", "--beta", "1",
                           "--max_length", "48", "--max_prompt_length", "32"])
    tokenizer, model = models.load_model(args.model)
    args.pad_token_id = tokenizer.pad_token_id
    pair = sample_a_pair(model, tokenizer)
    score_the_opponent(model, tokenizer, pair, args)
    train_the_policy(model, pair, args)


def sample_a_pair(model, tokenizer) -> dict:
    """Steps 1 to 3: a row of the data, its prompt's ids, y' ~ p_θ0 and y read off the template."""
    row = data.toy_rows("train")[0]
    prompt = row["messages"][-1]["content"]
    print("1. a row of the SFT data set")
    print(f"   prompt x = {prompt!r}   human answer y = {row['response']!r}")
    print(f"   p_data(·|x) = {data.toy_p_data(prompt)}")

    prompt_ids = data.ChatFormat(tokenizer).prompt_ids(row["messages"])
    print("\n2. the prompt through the chat template, the ids the model generates from and "
          "trains on")
    print(f"   text: {tokenizer.decode(prompt_ids)!r}")
    print(f"   ids:  {prompt_ids}")

    [sample] = generate.generate(model, tokenizer, [prompt_ids], generate.Sampling(16), seed=3)
    real_ids = data.ChatFormat(tokenizer).reply_ids(row["messages"], row["response"])
    print("\n3. the opponent p_θ0 samples y' (temperature 1); y is read off the chat template's "
          "rendering of the")
    print("   whole conversation, after the prompt's ids, through its end-of-turn token "
          "(EOS, id 2)")
    print(f"   y' = {sample['text']!r}  ids {sample['generated_ids']}  "
          f"ended with EOS: {sample['ended']}")
    print(f"   y  = {row['response']!r}  ids {real_ids}")
    return {"prompt_ids": prompt_ids, "real_ids": real_ids,
            "generated_ids": sample["generated_ids"]}


def score_the_opponent(model, tokenizer, pair: dict, args) -> None:
    """Step 4: log p_θ0 of y and y', per token and summed (spin.opponent_logps stores them)."""
    spin.opponent_logps(model, [pair], args)
    print("\n4. the opponent's log-probs: per token (each token given everything before it), "
          "then summed")
    prompt_ids = pair["prompt_ids"]
    for name, ids in (("y ", pair["real_ids"]), ("y'", pair["generated_ids"])):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0]  # (T, V)
        # position i predicts token i + 1: the response is predicted from len(prompt) - 1 on
        predicting = logits[len(prompt_ids) - 1:-1]
        token_logps = predicting.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
        cells = "  ".join(f"{tokenizer.convert_ids_to_tokens(i)}:{lp:.2f}"
                          for i, lp in zip(ids, token_logps.tolist()))
        print(f"   {name}  {cells}")
    for name, key in (("y|x) ", "opponent_real_logp"), ("y'|x)", "opponent_generated_logp")):
        print(f"   log p_θ0({name} = {pair[key]:.4f}   (p = {torch.tensor(pair[key]).exp():.4f})")


def train_the_policy(model, pair: dict, args) -> None:
    """Steps 5 and 6: the policy starts as the opponent (loss log 2); plain gradient steps show
    the direction Eq. 4.7 moves it."""
    model.train()
    spin.disable_dropout(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(4):
        # the policy p_θ, starting at θ = θ0: scored by the call that scored the opponent
        real, generated = spin.pair_logps(model, [pair], spin.Scoring.of_run(args))
        losses, real_rewards, generated_rewards = spin_loss(
            real, generated, torch.tensor([pair["opponent_real_logp"]]),
            torch.tensor([pair["opponent_generated_logp"]]), beta=args.beta)
        if step == 0:
            print("\n5. the policy starts as the opponent: log-ratios 0, margin 0, "
                  "loss ℓ(0) = log 2")
        margin = (real_rewards - generated_rewards).item()
        print(f"   step {step}: log p_θ(y|x) = {real.item():.4f}  "
              f"log p_θ(y'|x) = {generated.item():.4f}  "
              f"real reward λ·log p_θ/p_θ0 = {real_rewards.item():+.4f}  "
              f"generated reward = {generated_rewards.item():+.4f}  margin = {margin:+.4f}  "
              f"loss = {losses.item():.4f}")
        if step == 0:
            print(f"\n6. plain gradient steps (SGD, lr {LR}) on this one pair raise the margin:")
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "toy")
