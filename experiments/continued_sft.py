"""Continued SFT, the paper's baseline for claim (c): maximum likelihood of the human replies of the
same prompts SPIN trains on, with SPIN's optimizer and schedule (spin.rmsprop), batch size, gradient
clipping and number of optimizer steps. Used by toy_evidence.py and real_evidence.py, with the two
helpers they share to summarise seeds (mean_std, draw_both)."""
import statistics


import torch

import data
import spin
from machinery.logps import batch_logps


class ContinuedSFT:
    """SFT of `model` on `sequences` (data.build_sequence: prompt + human reply), run in blocks: one
    block per SPIN iteration, each with its own optimizer and warmup/decay schedule as SPIN
    builds one per iteration. Batches come from one seeded stream of shuffles that carries over
    between blocks."""

    def __init__(self, model, sequences: list[dict], batch_size: int, seed: int):
        self.model, self.sequences, self.batch_size = model, sequences, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> dict:
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.sequences), generator=self.generator).tolist()
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return data.collate([self.sequences[i] for i in batch])

    def run(self, steps: int, learning_rate: float, warmup_ratio: float = 0.1,
            max_grad_norm: float = 1.0) -> list[float]:
        """`steps` optimizer steps; returns each step's mean per-token loss (−log p of the reply
        tokens)."""
        self.model.train()
        spin.disable_dropout(self.model)
        optimizer, scheduler = spin.rmsprop(self.model, learning_rate, steps, warmup_ratio)
        losses = []
        for _ in range(steps):
            batch = self.next_batch()
            tokens = (batch["labels"][:, 1:] != -100).sum()
            loss = -batch_logps(self.model, batch).sum() / tokens  # per token, as SFT trains
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        self.model.eval()
        return losses


def mean_std(values: list) -> str:
    """Mean ± standard deviation over seeds, 3 decimals; one seed alone; "" for a measure that is
    absent."""
    if values[0] is None:
        return ""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def draw_both(ax, iters: int, series) -> None:
    """SPIN's and continued SFT's means over seeds with their spread, per model (start, then
    after each iteration); series(method) gives [model][seed] values."""
    x = list(range(iters + 1))
    for method, name in (("spin", "SPIN"), ("sft", "continued SFT")):
        values = series(method)
        ax.errorbar(x, [statistics.mean(v) for v in values],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values], marker="o",
                    capsize=3, label=name)
    ax.set_xticks(x, ["start"] + [str(t) for t in range(iters)])
    ax.set_xlabel("after iteration")
