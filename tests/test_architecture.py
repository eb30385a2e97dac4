"""The shape of the code: the paper's files at the top, the machinery in one package below them,
imports that point one way, and functions and lines short enough to read next to the paper."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"spin", "generate", "loss", "data"}  # Algorithm 1, line 3, Eq. 4.7 and log p(y|x), the SFT data
BUILDING_BLOCKS = {"generate", "loss", "data"}  # what the loop stands on; they stand on nothing of ours
TOP = PAPER | {"toy"}  # toy.py: the embedded toy, a teaching file
PACKAGE = "machinery"
SCRIPTS = {"benchmarks", "experiments", "docs"}  # run as `python -m benchmarks.smoke`; nothing imports them


def python_files() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if ".git" not in p.parts and not p.name.startswith(".")]


def module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The project modules a file imports: at the top, inside functions (unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    ours = TOP | {PACKAGE} | {module(p) for p in (ROOT / PACKAGE).glob("*.py")}
    return {name for name in found if name in ours}


def test_the_top_level_is_the_paper_and_one_package():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == {PACKAGE} | SCRIPTS
    library = [*ROOT.glob("*.py"), *(ROOT / PACKAGE).glob("*.py")]
    assert not {m.split(".")[0] for p in library for m in imports(p)} & SCRIPTS
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))} >= \
        {"machinery", "tests", "docs", "benchmarks", "experiments", "configs"}


def test_the_papers_building_blocks_import_nothing_from_the_package():
    """loss.py, data.py and generate.py stand alone (generate.py's command-line entry, main(), may use
    the package's flags and model loading); the package builds on them; spin.py stands on both."""
    for name in BUILDING_BLOCKS:
        path = ROOT / f"{name}.py"
        tree = ast.parse(path.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "main")]
        found = set()
        for node in (n for top in body for n in ast.walk(top)):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
        assert not found & ({PACKAGE, "spin", "toy"}), (name, found)
    assert imports(ROOT / "loss.py") == set()  # tensors in, tensors out
    assert imports(ROOT / "toy.py") <= {"data", "loss"}  # the toy is read with the paper, not the machinery


def test_no_module_imports_one_that_imports_it_back():
    files = [p for p in python_files() if p.parent in (ROOT, ROOT / PACKAGE)]
    graph = {module(p): {i if i in {module(q) for q in files} else i.rsplit(".", 1)[0] for i in imports(p)}
             - {module(p), PACKAGE} for p in files}

    def below(m, seen=()):
        return set(graph.get(m, ())) | {x for d in graph.get(m, ()) if d not in seen for x in below(d, (*seen, m))}

    cycles = sorted((m, d) for m in graph for d in graph[m] if m in below(d))
    assert cycles == [], cycles


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {f"{module(path)}.{n.name}": n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_algorithm_1_reads_on_a_screen():
    spin = ROOT / "spin.py"
    assert len(spin.read_text().splitlines()) <= 300  # with its calls in keywords (test below)
    assert {k: v for p in ROOT.glob("*.py") for k, v in function_lengths(p).items() if v > 50} == {}
    assert {k: v for p in (ROOT / PACKAGE).glob("*.py") for k, v in function_lengths(p).items() if v > 80} == {}


def the_projects_code() -> list[Path]:
    """Every Python file outside the tests (and outside run directories and environments)."""
    return [p for p in python_files()
            if p.relative_to(ROOT).parts[0] not in ("tests", "runs")
            and not any(part.startswith(".") or part == "site-packages" for part in p.parts)]


def test_lines_a_reader_can_see_whole():
    """Lines within 100 characters in every file of the project but the tests."""
    long = [f"{p.relative_to(ROOT)}:{i}" for p in the_projects_code()
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 100]
    assert long == []


def test_scripts_run_from_the_root_without_editing_sys_path():
    """Benchmarks and experiments are run as `python -m benchmarks.gpu` from the root, and pytest
    finds the project through pyproject.toml's pythonpath: no file edits sys.path."""
    edits = [str(p.relative_to(ROOT)) for p in python_files()
             if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert edits == [str(Path(__file__).relative_to(ROOT))]  # this test's own strings


def test_calls_say_what_they_pass():
    """No call in spin.py or the package passes more than six arguments by position: past that a
    reader must open the definition to know which value is which (keywords instead)."""
    files = [ROOT / "spin.py", *sorted((ROOT / PACKAGE).glob("*.py"))]
    crowded = [f"{p.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}"
               for p in files for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, ast.Call) and len(node.args) > 6]
    assert crowded == []
