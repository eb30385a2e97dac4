"""The training backends: plain PyTorch for one process, DeepSpeed ZeRO-3 for several (the paper's
8×A100 recipe). Both offer the same few operations, so spin.train has one loop for either:

    trainer = backends.trainer(model, optimizer, args)    # chosen once
    trainer.backward(loss, last)
    trainer.step() -> gradient norm    (clipped to --max_grad_norm, then the optimizer's step)
    trainer.save_state / load_state (mid-iteration resume)    trainer.save_model (θ_{t+1})
    trainer.release()    (the iteration is over: its optimizer state is freed)
"""
import json
import math
import shutil
from pathlib import Path

import torch

from machinery import checkpoint, distributed
from machinery.cli import pairs_per_step


def deepspeed_config(args) -> dict:
    """The JSON of --deepspeed with its "auto" values filled from the flags: one source of truth."""
    config = json.loads(Path(args.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": pairs_per_step(args),
            "gradient_clipping": args.max_grad_norm}
    for key, value in fill.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = bool(args.bf16)
    return config


class Plain:
    """One process, plain PyTorch: the optimizer steps the model itself.

    The few operations a training step needs, the same for both backends (spin.train):
    backward(loss, last), step() -> gradient norm, save_state / load_state (the step to continue
    from, 0 with nothing saved), save_model, release."""

    applies_before_check = False  # step() applies nothing when the gradient norm is not finite

    def __init__(self, model, optimizer, args):
        self.policy, self.optimizer, self.max_grad_norm = model, optimizer, args.max_grad_norm

    def backward(self, loss, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip the gradients to --max_grad_norm and step the optimizer; returns the norm before
        clipping. A non-finite norm is returned without a step (spin.train stops the run on it)."""
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm).item()
        if math.isfinite(norm):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_state(self, path: Path, scheduler, step: int) -> None:
        checkpoint.save_training_state(path, self.policy, self.optimizer, scheduler, step)

    def load_state(self, path: Path, scheduler) -> int:
        """The step a stopped run saved its state at (every --save_steps), or 0 with nothing
        saved."""
        saved = checkpoint.saved_state(path)
        if not saved:
            return 0
        return checkpoint.load_training_state(saved, self.policy, self.optimizer, scheduler)

    def save_model(self, tokenizer, path: Path, args) -> None:
        checkpoint.save_model(self.policy, tokenizer, path)

    def release(self) -> None:
        """Free the optimizer state now (the caller drops the model)."""
        self.optimizer.state.clear()


class Zero3:
    """DeepSpeed ZeRO-3: the engine partitions weights, gradients and optimizer state over the ranks
    and steps the optimizer on each rank's partition."""

    # DeepSpeed's engine.step() clips and applies in one call, norm or not
    applies_before_check = True

    def __init__(self, model, optimizer, args):
        import deepspeed

        self.policy, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=deepspeed_config(args))
        self.policy.checkpoint_engine = safe_checkpoint_engine()

    def backward(self, loss, last: bool) -> None:
        # gradients are reduced at the step's last micro-batch
        self.policy.set_gradient_accumulation_boundary(last)
        self.policy.backward(loss, scale_wrt_gas=False)  # the loss is already the step's mean share

    def step(self) -> float:
        """Clip to --max_grad_norm and step RMSProp on this rank's partition; returns the global
        norm."""
        self.policy.step()
        return float(self.policy.get_global_grad_norm())

    def save_state(self, path: Path, scheduler, step: int) -> None:
        """Every rank writes its own partition (fp32 weights, RMSProp state) with DeepSpeed's
        checkpoint code into path.tmp; then rank 0 swaps the whole directory in. The scheduler,
        the step and the RNG travel as DeepSpeed's client state."""
        tmp = path.with_name(path.name + ".tmp")
        if distributed.writer():
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        self.policy.save_checkpoint(str(tmp), tag=STATE_TAG, save_latest=False, client_state={
            "step": step, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()})
        distributed.barrier()  # every rank's files are written
        if distributed.writer():
            checkpoint.replace_dir(tmp, path)
        distributed.barrier()

    def load_state(self, path: Path, scheduler) -> int:
        """Each rank reads its own partition's files (never another rank's), unpickling no code."""
        saved = checkpoint.saved_state(path)
        if not checkpoint.agreed(path.parent.parent, f"has a training state in {path}",
                                 saved is not None):
            return 0
        _, client = self.policy.load_checkpoint(str(saved), tag=STATE_TAG,
                                                load_lr_scheduler_states=False)
        scheduler.load_state_dict(client["scheduler"])
        torch.set_rng_state(client["rng"])
        return client["step"]

    def save_model(self, tokenizer, path: Path, args) -> None:
        """Every rank joins the gather of the partitioned weights, one module at a time; the
        ranks that write (rank 0, or each node's first rank when nodes keep their own copies)
        keep a CPU copy of each whole weight, in its training dtype, and write the model
        directory. With --use_peft only the adapters are saved, so only they are gathered."""
        import deepspeed

        writes, state, copies = distributed.writer(), {}, {}
        for prefix, module in self.policy.module.named_modules():
            own = [(name, p) for name, p in module.named_parameters(recurse=False)
                   if p.requires_grad or not args.use_peft]
            with deepspeed.zero.GatheredParameters([p for _, p in own]):
                if writes:
                    for name, p in own:  # a tied weight (lm_head = embed_tokens) stays one tensor
                        state[f"{prefix}.{name}" if prefix
                              else name] = copies.setdefault(id(p), p.detach().cpu().clone())
            for name, buffer in module.named_buffers(recurse=False):
                if writes and name not in module._non_persistent_buffers_set and not args.use_peft:
                    state[f"{prefix}.{name}" if prefix else name] = buffer.detach().cpu()
        if writes:
            checkpoint.save_model(self.policy.module, tokenizer, path, state_dict=state)
        distributed.barrier()

    def release(self) -> None:
        """Let go of this rank's partitions (fp32 masters, RMSProp state, gradient buffers: ~12
        GB per rank for 7B on 8 GPUs) before the next opponent loads. The engine and its hooks
        form reference cycles, which plain `del` leaves to the cyclic garbage collector, whenever
        it runs: the engine is destroyed here, and the caller collects once it has dropped the
        model too (spin.main)."""
        self.policy.destroy()
        self.policy = None


STATE_TAG = "state"  # iter{t}/checkpoint/state/: DeepSpeed's files of each rank


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, except that loading executes no code from the files: a
    run directory may come from elsewhere. torch.load(weights_only=True) reads tensors,
    containers and numbers, plus the three DeepSpeed types its ZeRO-3 optimizer files hold (an
    enum and the loss scalers, which are plain numbers). Saving uses torch's zip format, which
    weights_only reads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class WeightsOnly(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            torch.save(state_dict, path)

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnly()


def trainer(model, optimizer, args) -> Plain | Zero3:
    """The training backend, chosen once: ZeRO-3 with --deepspeed, plain PyTorch without."""
    return Zero3(model, optimizer, args) if args.deepspeed else Plain(model, optimizer, args)
