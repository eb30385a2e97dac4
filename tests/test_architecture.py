"""The shape of the code: arrows that point down (no import cycle), and Algorithm 1 short enough to read."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere: at the top, inside functions, in its command block."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in MODULES}
    return found - {module}


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: imports(m) for m in MODULES}

    def below(m, seen=()):
        return {d for d in graph[m]} | {x for d in graph[m] if d not in seen for x in below(d, (*seen, m))}

    cycles = sorted((m, d) for m in graph for d in graph[m] if m in below(d))
    assert cycles == [], cycles
    assert "toy" not in graph["data"]  # "toy" is resolved above data (toy.load_rows)
    assert graph["loss"] == set()  # tensors in, tensors out


def function_lengths(module: str) -> dict[str, int]:
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    return {f"{module}.{n.name}": n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_algorithm_1_fits_on_a_screen():
    lengths = {k: v for m in MODULES for k, v in function_lengths(m).items()}
    assert lengths["spin.main"] <= 60 and lengths["spin.train"] <= 60
    assert {k: v for k, v in lengths.items() if v > 80} == {}
