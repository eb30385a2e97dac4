"""--push_to_hub: every iteration's model, with its model card, the run's plot and held-out table,
uploaded to the Hub repository --hub_model_id as soon as the iteration is complete (rank 0).

Each iteration is one commit on the repository's main branch, so `from_pretrained(HUB_MODEL_ID)`
loads the newest model θ_{t+1}; a branch iter{t} keeps each one (`revision="iter0"`). The run
checks the Hub before doing any work: without network, a token or write access it stops with one
line. iter{t}/pushed.json records the commit; a resumed run first pushes the complete iterations
that are missing one (a run stopped, or offline, after an iteration finished).
"""
import json
import os
from pathlib import Path

from machinery import checkpoint

# The run's files uploaded with each model, by their name in the repository (the model directory has
# a config.json of its own: the run's goes in as spin_config.json).
RUN_FILES = {"spin.png": "spin.png", "evaluation.jsonl": "evaluation.jsonl",
             "spin_config.json": "config.json"}


def repo_id(args) -> str:
    return args.hub_model_id or Path(args.output_dir).name


def check(args) -> None:
    """Refuse --push_to_hub at start-up, in one line, when the upload could not happen."""
    from machinery.cli import UsageError

    if not args.push_to_hub:
        return
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE") == "1" or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError("--push_to_hub: the Hub is unreachable or offline mode is on "
                         "(HF_HUB_OFFLINE=1); run without --push_to_hub and upload the iter*/model "
                         "directories later")
    if huggingface_hub.get_token() is None:
        raise UsageError("--push_to_hub needs a Hugging Face token with write access: `hf auth "
                         "login` or HF_TOKEN")
    try:
        huggingface_hub.HfApi().create_repo(repo_id(args), exist_ok=True, private=True
                                            if args.hub_private_repo else None)
    except Exception as e:  # no network, a read-only token, a name taken by someone else
        raise UsageError(f"--push_to_hub: cannot create or reach {repo_id(args)} on the Hub "
                         f"({str(e).splitlines()[0][:200]})") from None


def push(args, run: Path, t: int) -> None:
    """One commit: iter{t}/model's files (its card README.md among them) at the repository's
    root, with the run's plot, held-out table and config (RUN_FILES); then the branch iter{t} at
    that commit. Skipped when iter{t}/pushed.json exists."""
    marker = run / f"iter{t}" / "pushed.json"
    if not args.push_to_hub or marker.exists():
        return
    import huggingface_hub

    model = run / f"iter{t}" / "model"
    files = {p.name: p for p in sorted(model.iterdir()) if p.is_file()}
    files |= {name: run / local for name, local in RUN_FILES.items() if (run / local).exists()}
    api, repo = huggingface_hub.HfApi(), repo_id(args)
    commit = api.create_commit(repo, operations=[huggingface_hub.CommitOperationAdd(name, str(path))
                                                 for name, path in files.items()],
                               commit_message=f"SPIN iteration {t}: θ_{t + 1} (from "
                                              f"{run.name}/iter{t}/model)")
    api.create_branch(repo, branch=f"iter{t}", revision=commit.oid, exist_ok=True)
    checkpoint.write_atomic(marker, json.dumps({"repo": repo, "commit": commit.oid,
                                                "url": commit.commit_url, "files": sorted(files)}))
    print(f"pushed iteration {t} to {commit.commit_url} (branch iter{t})")
