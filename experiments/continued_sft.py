"""Continued SFT, the paper's baseline for claim (c): maximum likelihood of the human replies of the
same prompts SPIN trains on, with SPIN's optimizer and schedule (spin.rmsprop), batch size, gradient
clipping and number of optimizer steps. Used by toy_evidence.py and real_evidence.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import data  # noqa: E402
import spin  # noqa: E402
from logps import batch_logps  # noqa: E402


class ContinuedSFT:
    """SFT of `model` on `sequences` (data.build_sequence: prompt + human reply), run in blocks: one
    block per SPIN iteration, each with its own optimizer and warmup/decay schedule as SPIN builds one
    per iteration. Batches come from one seeded stream of shuffles that carries over between blocks."""

    def __init__(self, model, sequences: list[dict], batch_size: int, seed: int):
        self.model, self.sequences, self.batch_size = model, sequences, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next_batch(self) -> dict:
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(len(self.sequences), generator=self.generator).tolist()
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return data.collate([self.sequences[i] for i in batch])

    def run(self, steps: int, learning_rate: float, warmup_ratio: float = 0.1, max_grad_norm: float = 1.0) -> list[float]:
        """`steps` optimizer steps; returns each step's mean per-token loss (−log p of the reply tokens)."""
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
