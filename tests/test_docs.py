"""The docs cannot drift from the code: the paper map is regenerated and compared, links resolve."""
import json
import math
import re
import sys
from pathlib import Path

from docs import make_paper_map

ROOT = Path(__file__).resolve().parents[1]


def test_the_paper_map_matches_the_code():
    committed = (ROOT / "docs" / "paper_map.md").read_text()
    assert committed == make_paper_map.render(), "the code changed: run `python -m docs.make_paper_map`"


def test_every_algorithm_line_and_theorem_is_mapped():
    text = (ROOT / "docs" / "paper_map.md").read_text()
    for needle in ["Eq. 4.7", "Line 1:", "Line 2:", "Line 3:", "Output:", "Theorem 5.2", "Theorem 5.4", "λ = 0.1",
                   "RMSProp", "global batch 64"]:
        assert needle in text, needle


def test_links_in_readme_and_docs_resolve():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"


def test_every_exercise_check_selects_tests():
    import shlex
    import subprocess

    text = (ROOT / "docs" / "exercises.md").read_text()
    commands = re.findall(r"Check[^`]*`python -m pytest ([^`]*)`", text)
    assert len(commands) >= 8 and len(re.findall(r"^## \d+\.", text, flags=re.M)) == len(commands)
    # One interpreter collects for every command (torch and transformers are imported once, not ten times).
    script = ("import json, sys, pytest\n"
              "class Count:\n"
              "    def pytest_collection_finish(self, session):\n"
              "        self.n = len(session.items)\n"
              "counts = []\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    count = Count()\n"
              "    code = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *args], plugins=[count])\n"
              "    counts.append([int(code), getattr(count, 'n', 0)])\n"
              "print('COUNTS', json.dumps(counts))\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps([shlex.split(c) for c in commands])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    counts = json.loads(result.stdout.split("COUNTS ")[-1])
    for command, (code, n) in zip(commands, counts):
        assert code == 0 and n > 0, (command, code, n)  # the check runs and selects at least one test


def test_the_walkthrough_runs_and_shows_what_the_page_says(small_sft_model):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "docs.walkthrough", str(small_sft_model)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    margins = [float(m) for m in re.findall(r"margin = ([+-]\d+\.\d+)", result.stdout)]
    losses = [float(m) for m in re.findall(r"loss = (\d+\.\d+)", result.stdout)]
    # At θ = θ_t the policy's and the opponent's log-probs come from the same call on the same batch
    # (with and without autograd), so the margin is 0 up to float32 rounding; the printed 4 decimals
    # are compared with a tolerance of one unit in the last printed place, not as text.
    assert abs(margins[0]) <= 1e-4 and abs(losses[0] - math.log(2)) <= 1e-4  # ℓ(0) = log 2 at θ = θ_t
    assert margins[-1] > margins[0]  # the steps raise the margin


def test_the_readmes_file_tables_count_lines_truly_and_list_every_module():
    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (\d+) \|", text, flags=re.M))
    for path, count in rows.items():
        assert len((ROOT / path).read_text().splitlines()) == int(count), f"README: {path} has another length"
    modules = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *(ROOT / "machinery").glob("*.py")]}
    assert modules - {"machinery/__init__.py"} <= set(rows), sorted(modules - set(rows))
