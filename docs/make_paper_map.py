"""Writes docs/paper_map.md: each piece of the paper, its LaTeX, and the code that implements it,
cut from the real files at whole statements, so the map cannot go stale: tests/test_docs.py fails
when the committed map differs from what this script writes now.

    python -m docs.make_paper_map          # rewrite docs/paper_map.md after changing the code

An excerpt is found by name in the file's syntax tree, never by line number: a whole function or
class, or the statements in one that call or assign a given name, or a recipe's keywords. Its
lines run from the first node's first line (decorators included) to the last node's last line, so
every excerpt parses as Python. When a name is gone, the script stops and says which entry to
point at the new name.
"""
import ast
import functools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StaleAnchor(LookupError):
    """An entry names code that is no longer there (or no longer unique): the code changed."""


@dataclass(frozen=True)
class Code:
    """One excerpt. scope: a function or class by dotted name ("main", "rmsprop.schedule",
    "Zero3.__init__"), or a module-level dict's entry ('RECIPES["zephyr-7b-sft-full"]'). With no
    targets the excerpt is the whole scope; else it runs from the first target to the last, which
    must be neighbours in one block. A target is "name(" (the statement that calls name), "name ="
    (the statement that assigns it), "def name" (a definition), or "name=" (a keyword argument).
    block="if" (or "for", "with", ...) widens a statement to the innermost such block around it."""
    file: str
    scope: str
    targets: tuple[str, ...] = ()
    block: str | None = None


def C(file: str, scope: str, *targets: str, block: str | None = None) -> Code:
    """Code(...) written short, for the table below."""
    return Code(file, scope, targets, block)


RECIPE = 'RECIPES["zephyr-7b-sft-full"]'
REC = "machinery/recipes.py"

# A "## " line is a section; else (heading, LaTeX, excerpts). Algorithm 1's lines are numbered as
# arXiv v3 numbers them: 1 for t, 2 for i, 3 generate y', 4 end for, 5 update θ_{t+1}, 6 end for.
ENTRIES = [
    "## Section 4: the two players",
    ("log p(y|x): the sum of the response tokens' log-probabilities",
     r"\log p_\theta(y|x) = \sum_{j=1}^{|y|} \log p_\theta(y_j \mid x, y_{<j})",
     [C("loss.py", "sequence_logps")]),
    ("The main player: a function f that scores human responses above synthetic ones, trained with "
     "a monotone decreasing convex loss ℓ",
     r"f_{t+1} = \arg\min_{f \in \mathcal{F}_t} \mathbb{E}_{x, y \sim p_{data}(\cdot|x), y' \sim "
     r"p_{\theta_t}(\cdot|x)}\big[\ell\big(f(x, y) - f(x, y')\big)\big]",
     [C("loss.py", "spin_loss", "margins =")]),
    ("The opponent's update: KL-regularized, with the closed form p ∝ p_θt · exp(f/λ), which makes "
     "f = λ·log p_θ/p_θt (the rewards)",
     r"p_{\theta_{t+1}}(y|x) \propto p_{\theta_t}(y|x) \exp\big(\lambda^{-1} f_{t+1}(x, "
     r"y)\big)\quad\Longleftrightarrow\quad f_{t+1}(x, y) = \lambda \log "
     r"\frac{p_{\theta_{t+1}}(y|x)}{p_{\theta_t}(y|x)}",
     [C("loss.py", "spin_loss", "real_logratios =", "generated_logratios ="),
      C("loss.py", "spin_loss", "real_rewards =", "generated_rewards =")]),
    ("Eq. 4.7: the SPIN objective; logistic ℓ(t) = log(1 + e^{−t}), or hinge ℓ(t) = max(0, 1 − t)",
     r"L_{SPIN}(\theta, \theta_t) = \mathbb{E}\Big[\ell\Big(\lambda \log "
     r"\frac{p_\theta(y|x)}{p_{\theta_t}(y|x)} - \lambda \log "
     r"\frac{p_\theta(y'|x)}{p_{\theta_t}(y'|x)}\Big)\Big]",
     [C("loss.py", "spin_loss")]),
    "## Algorithm 1: Self-Play Fine-Tuning",
    ("Input: the SFT data set {(x_i, y_i)}, y_i ~ p_data(·|x_i)", r"\{(x_i, y_i)\}_{i \in [N]}",
     [C("machinery/prepare.py", "prepare", "data.load_rows(")]),
    ("Input: the SFT model p_θ0", r"\theta_0",
     [C("machinery/prepare.py", "prepare", "load_model(")]),
    ("… prompt x and human reply y as tokens: the chat template writes both", r"x_i,\ y_i",
     [C("data.py", "ChatFormat.pair")]),
    ("Lines 1 and 6: for t = 0, ..., T − 1 … end for", r"\textbf{for } t = 0, \dots, T - 1",
     [C("spin.py", "main", "range(")]),
    ("Lines 2 to 4: for i = 1, ..., N, generate y'_i ~ p_θt(·|x_i) with the frozen opponent; "
     "end for",
     r"y'_i \sim p_{\theta_t}(\cdot \mid x_i)", [C("spin.py", "main", "sample_pairs(")]),
    ("… the loop over i, in batches of prompts (generate.generate)",
     r"y'_i \sim p_{\theta_t}(\cdot \mid x_i)",
     [C("generate.py", "generate", "sample_batch(", block="for")]),
    ("… one batch through transformers' model.generate",
     r"y'_i \sim p_{\theta_t}(\cdot \mid x_i)",
     [C("generate.py", "sample_batch", "model.generate(")]),
    ("… each (x, y, y') row of iteration t", r"(x_i, y_i, y'_i)", [C("data.py", "spin_pair")]),
    ("… the opponent's log-probs, once per iteration: p_θt is frozen, so no second model is kept",
     r"\log p_{\theta_t}(y_i|x_i),\ \log p_{\theta_t}(y'_i|x_i)",
     [C("spin.py", "main", "opponent_pass("), C("spin.py", "opponent_logps")]),
    ("… log p(y|x) and log p(y'|x) of a batch of pairs, real and generated in one forward; the "
     "textbook path (--no-fast_logps, the toy's default) runs loss.sequence_logps on the logits",
     r"\log p_\theta(y_i|x_i),\ \log p_\theta(y'_i|x_i)",
     [C("spin.py", "pair_logps"), C("machinery/logps.py", "score", "sequence_logps(", block="if")]),
    ("Line 5: update θ_{t+1} = argmin_θ Σ_i ℓ(...) (Eq. 4.7), from θ = θ_t",
     r"\theta_{t+1} = \arg\min_{\theta} \sum_{i} \ell\Big(\lambda \log "
     r"\frac{p_\theta(y_i|x_i)}{p_{\theta_t}(y_i|x_i)} - \lambda \log "
     r"\frac{p_\theta(y'_i|x_i)}{p_{\theta_t}(y'_i|x_i)}\Big)",
     [C("spin.py", "main", "train("), C("spin.py", "train_step", "spin_loss(", "trainer.backward("),
      C("spin.py", "train", "trainer.step(")]),
    ("Output: θ_T (each θ_{t+1} is saved, and is the next opponent)", r"\theta_T",
     [C("spin.py", "main", "trainer.save_model(")]),
    "## Section 5: theory, checked on a tabular policy",
    ("Theorem 5.2: θ_t is a global minimum of L_SPIN(·, θ_t) iff p_θt = p_data; then the loss is "
     "ℓ(0)",
     r"p_{\theta_t}(\cdot|x) = p_{data}(\cdot|x) \;\Longrightarrow\; L_{SPIN}(\theta, \theta_t) "
     r"\ge \ell(0) = L_{SPIN}(\theta_t, \theta_t)",
     [C("tests/test_theory.py", "test_theorem_5_2_p_data_is_a_fixed_point_with_loss_l0"),
      C("tests/test_theory.py",
        "test_theorem_5_2_necessity_theta_t_is_not_optimal_when_p_t_differs_from_p_data")]),
    ("Theorem 5.4 (logistic ℓ): the next iterate",
     r"p_{\theta_{t+1}}(y|x) \propto "
     r"p_{\theta_t}(y|x)\Big(\frac{p_{data}(y|x)}{p_{\theta_t}(y|x)}\Big)^{1/\lambda}",
     [C("tests/test_theory.py",
        "test_theorem_5_4_the_minimizer_is_p_t_times_ratio_to_the_one_over_lambda")]),
    "## Section 5.1 and the official configs: the recipe (`--model zephyr-7b-sft-full`)",
    ("λ = 0.1", r"\lambda = 0.1", [C(REC, RECIPE, "beta=")]),
    ("learning rates 5e-7, 5e-7, 1e-7, 1e-7, one per iteration", r"\eta_t",
     [C(REC, RECIPE, "learning_rate=")]),
    ("RMSProp without weight decay", r"\text{RMSProp},\ \text{weight decay} = 0",
     [C("spin.py", "rmsprop", "torch.optim.RMSprop(")]),
    ("linear schedule with 10% warmup", r"\text{warmup} = 0.1",
     [C(REC, RECIPE, "warmup_ratio="), C("spin.py", "rmsprop", "warmup_steps =", "def schedule")]),
    ("2 epochs per iteration", r"\text{epochs} = 2", [C(REC, RECIPE, "num_train_epochs=")]),
    ("global batch 64 (8 GPUs × 8 per device)", r"B = 64",
     [C(REC, RECIPE, "per_device_train_batch_size=", "global_batch_size=")]),
    ("50k prompts of UltraChat 200k", r"N = 50{,}000",
     [C(REC, RECIPE, "dataset=", "max_samples=")]),
    ("iteration t ≥ 1 trains on the synthetic data of iterations t − 1 and t",
     r"\mathcal{D}_t = \mathcal{D}'_{t-1} \cup \mathcal{D}'_t",
     [C("spin.py", "main", "train_pairs =")]),
    ("max_length 1024, max_prompt_length 512 (the official configs)", r"T_{max} = 1024",
     [C(REC, RECIPE, "max_length=", "max_prompt_length=")]),
    ("sampling at temperature 1.0, top_p 1.0, 256 new tokens (the official scripts' vLLM path)",
     r"\tau = 1", [C(REC, RECIPE, "max_new_tokens=", "top_p=")]),
    ("bf16, gradient checkpointing, FlashAttention-2, DeepSpeed ZeRO-3", "",
     [C(REC, RECIPE, "bf16=", "deepspeed="), C("machinery/backends.py", "trainer"),
      C("machinery/backends.py", "Zero3.__init__", "deepspeed.initialize(")]),
]


@functools.cache
def parsed(file: str) -> tuple[str, ast.Module, dict[ast.AST, ast.AST]]:
    """A file's text, its syntax tree and each node's parent, read once per process."""
    text = (ROOT / file).read_text()
    tree = ast.parse(text)
    up = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return text, tree, up


def find_scope(tree: ast.Module, code: Code) -> ast.AST:
    """The function or class named by code.scope (dotted), or a module-level dict's entry."""
    if entry := re.fullmatch(r'(\w+)\["([^"]+)"\]', code.scope):
        name, key = entry.groups()
        for node in tree.body:
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [name]:
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Constant) and k.value == key:
                        return v
        raise StaleAnchor(f"{code.file} has no {code.scope}")
    node: ast.AST = tree
    for name in code.scope.split("."):
        found = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                         ast.ClassDef)) and n.name == name]
        if not found:
            raise StaleAnchor(f"{code.file} has no function or class {code.scope}")
        node = found[0]
    return node


def matches(node: ast.AST, target: str) -> bool:
    """Whether node is what target names: "f(" a call of f, "x =" an assignment to x, "def f" the
    definition of f, "k=" the keyword argument k."""
    if target.endswith("("):
        return isinstance(node, ast.Call) and ast.unparse(node.func) == target[:-1]
    if target.endswith(" ="):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {ast.unparse(n) for t in targets for n in ast.walk(t)}
            return target[:-2] in names
        return False
    if target.startswith("def "):
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        return isinstance(node, kinds) and node.name == target[4:]
    if target.endswith("="):
        return isinstance(node, ast.keyword) and node.arg == target[:-1]
    raise ValueError(f"unknown target {target!r}: use 'f(', 'x =', 'def f' or 'k='")


def find_node(scope: ast.AST, up: dict, code: Code, target: str) -> ast.AST:
    """The one statement (or keyword argument) inside scope that target names."""
    found = []
    for node in ast.walk(scope):
        if node is scope or not matches(node, target):
            continue
        if isinstance(node, ast.expr):  # a call: the whole statement around it
            while not isinstance(node, ast.stmt):
                node = up[node]
        if node not in found:
            found.append(node)
    if len(found) != 1:
        lines = ", ".join(str(n.lineno) for n in found)
        raise StaleAnchor(f"{code.file}: {code.scope} has " + (
            f"no {target!r}" if not found else f"{target!r} at several lines ({lines})"))
    return found[0]


def widen(node: ast.AST, up: dict, code: Code) -> ast.AST:
    """The innermost statement of kind code.block ("if", "for", ...) around node, or node."""
    if code.block is None:
        return node
    kind = getattr(ast, code.block.capitalize())
    while not isinstance(node, kind):
        if node not in up or isinstance(node, ast.Module):
            raise StaleAnchor(f"{code.file}: no {code.block} block around {code.targets}")
        node = up[node]
    return node


def block_of(node: ast.AST, up: dict) -> list | None:
    """The list node stands in: its parent's body, orelse, ... or keywords (None: the module)."""
    parent = up.get(node)
    for field in ast.iter_fields(parent) if parent else []:
        if isinstance(field[1], list) and any(n is node for n in field[1]):
            return field[1]
    return None


def first_line(node: ast.AST) -> int:
    """A node's first line, its decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def cut(code: Code) -> tuple[int, str, str]:
    """(first line, where it lies, the excerpt dedented) of one Code."""
    text, tree, up = parsed(code.file)
    scope = find_scope(tree, code)
    if code.targets:
        nodes = [widen(find_node(scope, up, code, t), up, code) for t in code.targets]
        where = code.scope
    else:
        nodes, where = [scope], code.scope.rpartition(".")[0]
    first, last = nodes[0], nodes[-1]
    blocks = [block_of(n, up) for n in nodes]
    if any(b is not blocks[0] for b in blocks) or first_line(first) > last.lineno:
        raise StaleAnchor(f"{code.file}: {code.targets} in {code.scope} are not one run of "
                          f"neighbouring statements")
    lines = text.splitlines()
    before = lines[first_line(first) - 1][:first.col_offset]
    after = lines[last.end_lineno - 1][last.end_col_offset:]
    if before.strip() or not re.fullmatch(r"\s*,?\s*(#.*)?", after):
        raise StaleAnchor(f"{code.file}:{first.lineno}: {code.targets} share a line with other "
                          f"code, so no whole lines hold them")
    excerpt = textwrap.dedent("\n".join(lines[first_line(first) - 1:last.end_lineno]))
    ast.parse(excerpt)  # whole statements, so this cannot fail; the test checks it too
    return first_line(first), where, excerpt


def render() -> str:
    """The page, from the files as they are."""
    out = ["# The paper, mapped to the code", "",
           "Chen et al., *Self-Play Fine-Tuning Converts Weak Language Models to Strong Language "
           "Models*, ICML 2024,",
           "arXiv:2401.01335. Each entry: the LaTeX, then where the code computes it (file, line, "
           "and the",
           "function or recipe it lies in) and the code itself, cut at whole statements. "
           "Equation, theorem and",
           "line numbers are arXiv v3's. Algorithm 1's lines: 1 for t, 2 for i, 3 generate y', "
           "4 end for,",
           "5 update θ_{t+1}, 6 end for. Section 4's pieces other than Eq. 4.7 are named by their "
           "role.",
           "Generated by `python -m docs.make_paper_map`; `tests/test_docs.py` fails when this "
           "page and the",
           "code disagree.", ""]
    for entry in ENTRIES:
        if isinstance(entry, str):
            out += [entry, ""]
            continue
        heading, latex, codes = entry
        out += [f"### {heading}", ""]
        if latex:
            out += ["$$", latex, "$$", ""]
        for code in codes:
            try:
                line, where, excerpt = cut(code)
            except StaleAnchor as e:
                raise StaleAnchor(f"{e}. The code changed: in docs/make_paper_map.py, point the "
                                  f"entry {heading!r} at the code as it is now") from None
            place = f"`{code.file}:{line}`" + (f", in `{where}`" if where else "")
            out += [place, "", "```python", excerpt, "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    try:
        page = render()
    except StaleAnchor as e:  # one line that says which entry to fix, not a traceback
        raise SystemExit(f"docs/make_paper_map.py: {e}") from None
    (ROOT / "docs" / "paper_map.md").write_text(page)
    print("wrote docs/paper_map.md")
