"""The run directory's operations, named as Algorithm 1 uses them (spin.py): what is done, what a
stopped run left, and where each phase's results go. Files and markers: checkpoint.py.

    run = RunDir(args, config)          # refuses a foreign directory, a second process, a change
    run.begin(tokens)                   # config.json and tokens.jsonl of a new run
    run.completed()                     # iterations whose complete.json exists
    run.iteration(t)                    # iter{t}/, made when needed
    run.pairs(t) / run.sampled(t, ids) / run.save_pairs(...)      generation: y' ~ p_θt
    run.opponent_logps(t, pairs) / run.save_opponent_logps(...)   the opponent pass
    run.complete(t, row)                # the marker that iteration t is done, written last

Every write is rank 0's (or, when nodes keep their own copies, each node's first rank's); the
other ranks wait. Results of several ranks meet through the process group, not the disk.
"""
import json
from pathlib import Path

from machinery import checkpoint, distributed


class RunDir:
    """--output_dir as the state of one run: taken for this process (lock), checked against the
    configuration, and asked what is already done. Every write is rank 0's; the others wait.

        run = RunDir(args, config)     # refuses a foreign directory, a second process, a change
        run.begin(tokens)              # config.json and tokens.jsonl of a new run
        run.completed()                # iterations whose complete.json exists
        run.iteration(t)               # iter{t}/, made when needed
    """

    def __init__(self, args, config: dict):
        self.path, self.config, self.args = Path(args.output_dir), config, args
        found = {p.name for p in self.path.iterdir()
                 if not p.name.startswith(".probe-")} if self.path.is_dir() else set()
        if found and "config.json" not in found and found - checkpoint.STARTUP_LEFTOVERS:
            raise checkpoint.RunDirError(f"--output_dir {self.path} is a non-empty directory that "
                                         f"is not a SPIN run; choose another")
        # several nodes: one directory, or a copy on each
        distributed.find_shared_disk(self.path)
        # rank 0, or each node's first rank into its own copy
        self.writer = distributed.writer()
        if found and self.writer:
            checkpoint.lock(self.path)  # one run per directory, before reading its state
        self.new = not found
        self.resuming = checkpoint.agreed(self.path, "resumes",
                                          "config.json" in found and not args.overwrite_output_dir)
        if self.resuming:
            checkpoint.check_config(self.path, config)
        elif found and "config.json" not in found and args.rank == 0:
            print(f"note: --output_dir {self.path} holds only what a start stopped before writing "
                  f"config.json left ({', '.join(sorted(found))}); starting the run there")

    def saved_tokens(self) -> Path | None:
        return self.path / "tokens.jsonl" if self.resuming else None

    def begin(self, token_rows: list[dict]) -> None:
        """A new run writes its config.json (and, for every run, its tokens.jsonl if missing)."""
        if not self.resuming and self.writer:
            # locked as soon as it exists; a second process started with this one stops here
            if self.new:
                self.path.mkdir(parents=True, exist_ok=True)
                checkpoint.lock(self.path)
                if (self.path / "config.json").exists():
                    raise checkpoint.RunInUse(f"--output_dir {self.path} was started by another "
                                              f"process meanwhile; run the same command again to "
                                              f"resume it")
            checkpoint.empty(self.path)  # --overwrite_output_dir, or what an interrupted start left
            checkpoint.write_atomic(self.path / "config.json", json.dumps(self.config, indent=1))
        if self.writer and not (self.path / "tokens.jsonl").exists():
            checkpoint.write_jsonl(self.path / "tokens.jsonl", token_rows)
        self._wait()

    def completed(self) -> int:
        """The number of complete iterations (cleaning what a kill right after a marker left)."""
        t = 0
        while (self.path / f"iter{t}" / "complete.json").exists():
            if self.writer:
                checkpoint.clean(self.path / f"iter{t}")
            t += 1
        return checkpoint.agreed(self.path, "has complete iterations, and how many", t)

    def iteration(self, t: int) -> Path:
        if self.writer:
            (self.path / f"iter{t}").mkdir(exist_ok=True)
        self._wait()
        return self.path / f"iter{t}"

    def file(self, t: int, name: str) -> Path:
        """The path of one of iteration t's files."""
        return self.path / f"iter{t}" / name

    def close(self) -> None:
        """The run is over: the directory's lock is released (a process's exit releases it
        anyway)."""
        checkpoint.unlock()

    def _wait(self) -> None:  # the other ranks wait for rank 0's writes
        distributed.barrier()

    # Generation (Algorithm 1, line 3): each rank appends its finished batches to its own partial
    # file, so a stopped run continues where it was; the shards then meet in synthetic.jsonl.

    def pairs(self, t: int) -> list[dict] | None:
        """Iteration t's (x, y, y') rows when its generation is complete, else None."""
        final = self.path / f"iter{t}" / "synthetic.jsonl"
        return checkpoint.read_jsonl(final) if final.exists() else None

    def sampled(self, t: int, ids: list) -> tuple[dict[int, dict], callable]:
        """What this rank sampled of its prompts `ids` before a stop ({position: result}), and the
        function that appends a finished generation batch (positions, results) to its partial
        file."""
        partial = self.path / f"iter{t}" / f"generated.rank{self.args.rank}.jsonl"
        found = checkpoint.read_jsonl(partial)
        # drop a line torn by a kill before appending to the file
        checkpoint.write_jsonl(partial, found)
        position = {row_id: k for k, row_id in enumerate(ids)}
        done = {position[d["id"]]: d for d in found}
        if done:
            distributed.print0(f"iteration {t}: found {len(done)} of {len(ids)} generated "
                               f"responses in {partial}; sampling the rest")

        def keep(positions: list[int], results: list[dict]) -> None:
            checkpoint.append_jsonl(partial,
                                    [{"id": ids[k], **r} for k, r in zip(positions, results)
                                              if k not in done])

        return done, keep

    def save_pairs(self, t: int, pairs: list[dict], order: list) -> list[dict]:
        """Every rank's pairs, gathered into synthetic.jsonl in the data's order (`order`: the rows'
        ids); the partial files go. Returns all of iteration t's pairs."""
        gathered = {p["id"]: p for p in distributed.all_gather(pairs)}
        if self.writer:
            it = self.path / f"iter{t}"
            checkpoint.write_jsonl(it / "synthetic.jsonl", [gathered[i] for i in order])
            for path in it.glob("generated.rank*.jsonl"):
                path.unlink()
        self._wait()
        return self.pairs(t)

    # The opponent pass: log p_θt of every training pair, computed once per iteration.

    def opponent_logps(self, t: int, pairs: list[dict]) -> list[tuple[float, float]] | None:
        """(log p_θt(y|x), log p_θt(y'|x)) of each of `pairs` as a stopped run saved them, else
        None."""
        saved = checkpoint.read_jsonl(self.path / f"iter{t}" / "opponent_logps.jsonl")
        if [(s["iteration"], s["id"]) for s in saved] != [(p["iteration"], p["id"]) for p in pairs]:
            return None
        return [(s["opponent_real_logp"], s["opponent_generated_logp"]) for s in saved]

    def save_opponent_logps(self, t: int, pairs: list[dict],
                            scored: dict[int, tuple[float, float]]):
        """Every rank's {pair index: (real, generated)}, gathered and saved; returns them in pair
        order."""
        by_index = dict(distributed.all_gather(list(scored.items())))
        logps = [by_index[i] for i in range(len(pairs))]
        if self.writer:
            checkpoint.write_jsonl(self.path / f"iter{t}" / "opponent_logps.jsonl", [
                {"iteration": p["iteration"], "id": p["id"], "opponent_real_logp": real,
                 "opponent_generated_logp": generated}
                 for p, (real, generated) in zip(pairs, logps)])
        self._wait()
        return logps

    def complete(self, t: int, row: dict) -> None:
        """iter{t}/complete.json, the marker that iteration t is done, written after everything
        else of it (into every node's copy when nodes keep their own); what the iteration no
        longer needs goes."""
        if self.writer:
            checkpoint.write_atomic(self.path / f"iter{t}" / "complete.json", json.dumps(row))
            checkpoint.clean(self.path / f"iter{t}")
        self._wait()
