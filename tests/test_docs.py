"""The docs cannot drift from the code: the paper map is regenerated and compared, its excerpts
parse and hold what their entries name, Algorithm 1 is numbered as the paper numbers it, links
resolve."""
import ast
import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest

from docs import make_paper_map

ROOT = Path(__file__).resolve().parents[1]
PAPER_MAP = ROOT / "docs" / "paper_map.md"

# Algorithm 1 of arXiv 2401.01335v3, by the paper's line numbers (../shared/paper-notes.md)
ALGORITHM_1 = {1: "for t", 2: "for i", 3: "generate y'", 4: "end for", 5: "update θ_{t+1}",
               6: "end for"}

# What each entry's excerpts must hold: "f(" a call of f (or of x.f), "def f" its definition,
# "x =" an assignment to x, "for t" a loop over t, "assert"; "k=v" a recipe keyword with the
# paper's value v; "a|b": either. One key per heading on the page, matched by its start.
CLAIMS = {
    "log p(y|x): the sum": ["def sequence_logps", "log_softmax(", "gather("],
    "The main player": ["margins ="],
    "The opponent's update": ["real_logratios =", "generated_logratios =", "real_rewards ="],
    "Eq. 4.7": ["def spin_loss", "F.softplus(", "torch.relu(", "losses ="],
    "Input: the SFT data set": ["data.load_rows("],
    "Input: the SFT model": ["load_model("],
    "… prompt x and human reply y": ["def pair"],
    "Lines 1 and 6": ["for t", "sample_pairs(", "train("],
    "Lines 2 to 4": ["sample_pairs("],
    "… the loop over i": ["sample_batch("],
    "… one batch through": ["model.generate("],
    "… each (x, y, y') row": ["def spin_pair"],
    "… the opponent's log-probs": ["opponent_pass(", "pair_logps(|score(|score_all("],
    "… log p(y|x) and log p(y'|x) of a batch": ["score(", "sequence_logps("],
    "Line 5": ["train(", "spin_loss(", "backward(", "step("],
    "Output": ["save_model("],
    "Theorem 5.2": ["def test_theorem_5_2_p_data_is_a_fixed_point_with_loss_l0", "assert"],
    "Theorem 5.4": ["minimize(", "assert"],
    "λ = 0.1": ["beta=0.1"],
    "learning rates": ["learning_rate=[5e-7, 5e-7, 1e-7, 1e-7]"],
    "RMSProp": ["torch.optim.RMSprop("],
    "linear schedule": ["warmup_ratio=0.1", "def schedule"],
    "2 epochs": ["num_train_epochs=2"],
    "global batch 64": ["global_batch_size=64", "per_device_train_batch_size=8"],
    "50k prompts": ["max_samples=50000", "dataset='HuggingFaceH4/ultrachat_200k'"],
    "iteration t ≥ 1": ["train_pairs ="],
    "max_length 1024": ["max_length=1024", "max_prompt_length=512"],
    "sampling at temperature": ["max_new_tokens=256", "temperature=1.0", "top_p=1.0"],
    "bf16, gradient checkpointing": ["bf16=True", "gradient_checkpointing=True",
                                     "attn_implementation='flash_attention_2'",
                                     "deepspeed='configs/ds_zero3.json'", "deepspeed.initialize("],
}


def paper_map_entries() -> dict[str, list[str]]:
    """{heading: its excerpts} of docs/paper_map.md."""
    chunks = re.split(r"^### ", PAPER_MAP.read_text(), flags=re.M)[1:]
    return {chunk.split("\n", 1)[0]: re.findall(r"```python\n(.*?)\n```", chunk, flags=re.S)
            for chunk in chunks}


def holds(trees: list[ast.Module], recipe: dict, claim: str) -> bool:
    """Whether the parsed excerpts hold what claim names (see CLAIMS)."""
    nodes = [n for tree in trees for n in ast.walk(tree)]
    if "|" in claim:
        return any(holds(trees, recipe, c) for c in claim.split("|"))
    if claim.endswith("("):
        names = [ast.unparse(n.func) for n in nodes if isinstance(n, ast.Call)]
        return any(n == claim[:-1] or n.endswith("." + claim[:-1]) for n in names)
    if claim.startswith("def "):
        return any(getattr(n, "name", None) == claim[4:] for n in nodes)
    if claim.endswith(" ="):
        return any(isinstance(n, ast.Assign) and claim[:-2] in map(ast.unparse, n.targets)
                   for n in nodes)
    if claim.startswith("for "):
        return any(isinstance(n, ast.For) and ast.unparse(n.target) == claim[4:] for n in nodes)
    if claim == "assert":
        return any(isinstance(n, ast.Assert) for n in nodes)
    key, value = claim.split("=", 1)
    return key in recipe and recipe[key] == ast.literal_eval(value)


def recipe_keywords(excerpt: str) -> dict:
    """The literal keyword arguments an excerpt of a recipe's dict(...) holds ({} for code)."""
    try:
        call = ast.parse(f"dict(\n{excerpt}\n)", mode="eval").body
    except SyntaxError:
        return {}
    found = {}
    for keyword in call.keywords:
        try:
            found[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            pass
    return found


def test_the_paper_map_matches_the_code():
    committed = PAPER_MAP.read_text()
    assert committed == make_paper_map.render(), "run `python -m docs.make_paper_map`"


def test_every_excerpt_parses_and_holds_what_its_entry_names():
    entries = paper_map_entries()
    for heading, excerpts in entries.items():
        keys = [key for key in CLAIMS if heading.startswith(key)]
        assert len(keys) == 1, f"{heading!r}: give it one entry in CLAIMS"
        assert excerpts, heading
        try:  # whole statements, so each parses on its own
            trees = [ast.parse(textwrap.dedent(excerpt)) for excerpt in excerpts]
        except SyntaxError as e:
            pytest.fail(f"{heading!r}: an excerpt is not cut at whole statements ({e})")
        recipe = {k: v for excerpt in excerpts for k, v in recipe_keywords(excerpt).items()}
        for claim in CLAIMS[keys[0]]:
            assert holds(trees, recipe, claim), f"{heading!r} shows no {claim!r}"
    assert len(entries) == len(CLAIMS)  # every claim names an entry that is there
    zero = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3  # the recipe's --deepspeed file is ZeRO-3, as its entry says


def test_algorithm_1_is_numbered_as_the_paper_numbers_it():
    """The paper map's headings name each line of Algorithm 1 by the paper's number, and every
    "Algorithm 1, line N" in the code and docs stands next to what line N does."""
    covered = set()
    for label, text in re.findall(r"^### (Lines? [^:]+): (.*)$", PAPER_MAP.read_text(), re.M):
        ends = [int(n) for n in re.findall(r"\d+", label)]
        numbers = range(ends[0], ends[-1] + 1) if " to " in label else ends
        for number in numbers:
            assert ALGORITHM_1[number] in text, (label, text)
        covered |= set(numbers)
    assert covered == set(ALGORITHM_1)
    words = {1: ["for t", "loop"], 2: ["for i"], 3: ["y'", "enerat"], 4: ["end for"],
             5: ["θ_{t+1}", "update", "train"], 6: ["end for", "loop"]}
    pages = [ROOT / "README.md", *ROOT.glob("*.py"), *ROOT.glob("*/*.py"), *ROOT.glob("docs/*.md")]
    for page in pages:
        text = page.read_text()
        for mention in re.finditer(r"Algorithm 1, lines? (\d)", text):
            near = text[max(0, mention.start() - 40):mention.end() + 60]
            number = int(mention.group(1))
            assert any(w in near for w in words[number]), f"{page.name}: {near!r}"


def test_the_paper_map_says_what_it_is_and_nothing_about_how_it_was_made():
    header = PAPER_MAP.read_text().split("\n## ", 1)[0]
    assert "arXiv v3" in header and "1 for t, 2 for i, 3 generate y'" in header
    assert not re.search(r"could not|this machine|session", header, flags=re.I)


def test_a_missing_or_ambiguous_anchor_stops_the_generator_naming_the_entry(monkeypatch):
    C = make_paper_map.C
    missing = ("Line 5: update", "", [C("spin.py", "train_step", "no_such_call(")])
    monkeypatch.setattr(make_paper_map, "ENTRIES", [missing])
    with pytest.raises(make_paper_map.StaleAnchor, match=r"has no 'no_such_call\('.*'Line 5"):
        make_paper_map.render()
    # spin_loss assigns `losses` in three branches: the name does not say which
    ambiguous = ("Eq. 4.7", "", [C("loss.py", "spin_loss", "losses =")])
    monkeypatch.setattr(make_paper_map, "ENTRIES", [ambiguous])
    with pytest.raises(make_paper_map.StaleAnchor, match=r"'losses =' at several lines"):
        make_paper_map.render()
    gone = ("Eq. 4.7", "", [C("loss.py", "no_such_function")])
    monkeypatch.setattr(make_paper_map, "ENTRIES", [gone])
    with pytest.raises(make_paper_map.StaleAnchor, match="loss.py has no function or class"):
        make_paper_map.render()


def test_links_in_readme_and_docs_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


@pytest.mark.slow  # starts a process
def test_every_exercise_check_selects_tests():
    import shlex
    import subprocess

    text = (ROOT / "docs" / "exercises.md").read_text()
    commands = re.findall(r"Check[^`]*`python -m pytest ([^`]*)`", text)
    assert len(commands) >= 8 and len(re.findall(r"^## \d+\.", text, flags=re.M)) == len(commands)
    # One interpreter collects for every command (torch and transformers are imported once, not
    # ten times).
    script = ("import json, sys, pytest\n"
              "class Count:\n"
              "    def pytest_collection_finish(self, session):\n"
              "        self.n = len(session.items)\n"
              "counts = []\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    count = Count()\n"
              "    code = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *args],\n"
              "                       plugins=[count])\n"
              "    counts.append([int(code), getattr(count, 'n', 0)])\n"
              "print('COUNTS', json.dumps(counts))\n")
    argv = json.dumps([shlex.split(c) for c in commands])
    result = subprocess.run([sys.executable, "-c", script, argv], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    counts = json.loads(result.stdout.split("COUNTS ")[-1])
    for command, (code, n) in zip(commands, counts):
        # the check runs and selects at least one test
        assert code == 0 and n > 0, (command, code, n)


@pytest.mark.slow  # starts a process
def test_the_walkthrough_runs_and_shows_what_the_page_says(small_sft_model):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "docs.walkthrough", str(small_sft_model)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    margins = [float(m) for m in re.findall(r"margin = ([+-]\d+\.\d+)", result.stdout)]
    losses = [float(m) for m in re.findall(r"loss = (\d+\.\d+)", result.stdout)]
    # At θ = θ_t the policy's and the opponent's log-probs come from the same call on the same batch
    # (with and without autograd), so the margin is 0 up to float32 rounding; the printed 4 decimals
    # are compared with a tolerance of one unit in the last printed place, not as text.
    # ℓ(0) = log 2 at θ = θ_t
    assert abs(margins[0]) <= 1e-4 and abs(losses[0] - math.log(2)) <= 1e-4
    assert margins[-1] > margins[0]  # the steps raise the margin


def test_the_readmes_file_tables_count_lines_truly_and_list_every_module():
    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (\d+) \|", text, flags=re.M))
    for path, count in rows.items():
        lines = len((ROOT / path).read_text().splitlines())
        assert lines == int(count), f"README: {path} has another length"
    files = [*ROOT.glob("*.py"), *(ROOT / "machinery").glob("*.py")]
    modules = {p.relative_to(ROOT).as_posix() for p in files}
    assert modules - {"machinery/__init__.py"} <= set(rows), sorted(modules - set(rows))
