"""The docs cannot drift from the code: the paper map is regenerated and compared, links resolve."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import make_paper_map  # noqa: E402


def test_the_paper_map_matches_the_code():
    committed = (ROOT / "docs" / "paper_map.md").read_text()
    assert committed == make_paper_map.render(), "the code changed: run `python docs/make_paper_map.py`"


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
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *shlex.split(command)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and re.search(r"^(\d+)/\d+ tests collected|^\d+ tests? collected",
                                                    result.stdout, flags=re.M), (command, result.stdout[-500:])


def test_the_walkthrough_runs_and_shows_what_the_page_says(small_sft_model):
    import subprocess

    result = subprocess.run([sys.executable, "docs/walkthrough.py", str(small_sft_model)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    margins = [float(m) for m in re.findall(r"margin = ([+-]\d+\.\d+)", result.stdout)]
    assert "loss = 0.6931" in result.stdout.split("step 1")[0]  # ℓ(0) = log 2 at θ = θ_t
    assert margins[0] == 0.0 and margins[-1] > margins[0]  # the steps raise the margin
