"""Writes docs/paper_map.md: each piece of the paper, its LaTeX, and the code lines that implement
it, cut from the real files, so the map cannot go stale: tests/test_docs.py fails when the committed
map differs from what this script writes now.

    python -m docs.make_paper_map          # rewrite docs/paper_map.md after changing the code
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (heading, LaTeX, file, anchor: the first line of the excerpt contains it, lines in the excerpt)
ENTRIES = [
    ("## Section 4: the two players", None, None, None, 0),
    ("log p(y|x): the sum of the response tokens' log-probabilities",
     r"\log p_\theta(y|x) = \sum_{j=1}^{|y|} \log p_\theta(y_j \mid x, y_{<j})",
     "loss.py", "logits = logits[:, :-1, :]", 11),
    ("The main player: a function f that scores human responses above synthetic ones, trained with "
     "a monotone decreasing convex loss ℓ",
     r"f_{t+1} = \arg\min_{f \in \mathcal{F}_t} \mathbb{E}_{x, y \sim p_{data}(\cdot|x), y' \sim "
     r"p_{\theta_t}(\cdot|x)}\big[\ell\big(f(x, y) - f(x, y')\big)\big]",
     "loss.py", "margins = beta * (real_logratios - generated_logratios)", 1),
    ("The opponent's update: KL-regularized, with the closed form p ∝ p_θt · exp(f/λ), which makes "
     "f = λ·log p_θ/p_θt (the rewards)",
     r"p_{\theta_{t+1}}(y|x) \propto p_{\theta_t}(y|x) \exp\big(\lambda^{-1} f_{t+1}(x, "
     r"y)\big)\quad\Longleftrightarrow\quad f_{t+1}(x, y) = \lambda \log "
     r"\frac{p_{\theta_{t+1}}(y|x)}{p_{\theta_t}(y|x)}",
     "loss.py", "real_logratios = policy_real_logps - opponent_real_logps", 2),
    ("Eq. 4.7: the SPIN objective; logistic ℓ(t) = log(1 + e^{−t}), or hinge ℓ(t) = max(0, 1 − t)",
     r"L_{SPIN}(\theta, \theta_t) = \mathbb{E}\Big[\ell\Big(\lambda \log "
     r"\frac{p_\theta(y|x)}{p_{\theta_t}(y|x)} - \lambda \log "
     r"\frac{p_\theta(y'|x)}{p_{\theta_t}(y'|x)}\Big)\Big]",
     "loss.py", 'if loss_type == "logistic":', 8),
    ("## Algorithm 1: Self-Play Fine-Tuning", None, None, None, 0),
    ("Input: the SFT data set {(x_i, y_i)}, y_i ~ p_data(·|x_i)", r"\{(x_i, y_i)\}_{i \in [N]}",
     "machinery/prepare.py", "rows = data.load_rows(", 2),
    ("Input: the SFT model p_θ0", r"\theta_0", "machinery/prepare.py",
     "tokenizer, model = load_model(args.model", 1),
    ("… prompt x and human reply y as tokens: the chat template writes both",
     r"x_i,\ y_i", "data.py", "def pair(self, messages", 10),
    ("Line 1: for t = 0, ..., T − 1", r"\textbf{for } t = 0, \dots, T - 1",
     "spin.py", "for t in range(completed, args.iters):", 1),
    ("Line 2: for each prompt, generate synthetic data y' ~ p_θt(·|x) with the frozen opponent",
     r"y'_i \sim p_{\theta_t}(\cdot \mid x_i)", "spin.py", "pairs = sample_pairs(model", 1),
    ("… sampled in batches by generate.generate", r"y'_i \sim p_{\theta_t}(\cdot \mid x_i)",
     "generate.py", "output = model.generate(", 2),
    ("… each (x, y, y') row of iteration t", r"(x_i, y_i, y'_i)", "data.py", "def spin_pair(", 8),
    ("… the opponent's log-probs, once per iteration: p_θt is frozen, so no second model is kept",
     r"\log p_{\theta_t}(y_i|x_i),\ \log "
     r"p_{\theta_t}(y'_i|x_i)", "spin.py", "opponent_pass(model, train_pairs", 1),
    ("… log p(y|x) of a batch, in spin.py's calls: the textbook path (--no-fast_logps, the toy's "
     "default) runs loss.sequence_logps on the logits",
     r"\log p_\theta(y|x)", "machinery/logps.py", "    if not fast:", 6),
    ("Line 3: update θ_{t+1} = argmin_θ Σ_i ℓ(...) (Eq. 4.7), from θ = θ_t",
     r"\theta_{t+1} = \arg\min_{\theta} \sum_{i} \ell\Big(\lambda \log "
     r"\frac{p_\theta(y_i|x_i)}{p_{\theta_t}(y_i|x_i)} - \lambda \log "
     r"\frac{p_\theta(y'_i|x_i)}{p_{\theta_t}(y'_i|x_i)}\Big)",
     "spin.py", "losses, real_rewards, generated_rewards = spin_loss(", 5),
    ("Output: θ_T (each θ_{t+1} is saved, and is the next opponent)", r"\theta_T",
     "spin.py", "trainer.save_model(tokenizer, it / \"model\", args)", 1),
    ("## Section 5: theory, checked exactly on a tabular policy", None, None, None, 0),
    ("Theorem 5.2: θ_t is a global minimum of L_SPIN(·, θ_t) iff p_θt = p_data; then the loss is "
     "ℓ(0)",
     r"p_{\theta_t}(\cdot|x) = p_{data}(\cdot|x) \;\Longrightarrow\; L_{SPIN}(\theta, \theta_t) "
     r"\ge \ell(0) = L_{SPIN}(\theta_t, \theta_t)",
     "tests/test_theory.py", "def test_theorem_5_2_p_data_is_a_fixed_point_with_loss_l0", 12),
    ("Theorem 5.4 (logistic ℓ): the next iterate",
     r"p_{\theta_{t+1}}(y|x) \propto "
     r"p_{\theta_t}(y|x)\Big(\frac{p_{data}(y|x)}{p_{\theta_t}(y|x)}\Big)^{1/\lambda}",
     "tests/test_theory.py",
     "def test_theorem_5_4_the_minimizer_is_p_t_times_ratio_to_the_one_over_lambda", 5),
    ("## Section 5.1: the recipe's hyperparameters", None, None, None, 0),
    ("λ = 0.1", r"\lambda = 0.1", "machinery/recipes.py", "RECIPES = { >> beta=0.1,  # the paper",
     1),
    ("learning rates 5e-7, 5e-7, 1e-7, 1e-7, one per iteration",
     r"\eta_t", "machinery/recipes.py", "RECIPES = { >> learning_rate=[5e-7, 5e-7, 1e-7, 1e-7],\n  "
                                        "      num_train_epochs", 1),
    ("RMSProp without weight decay", r"\text{RMSProp},\ \text{weight decay} = 0",
     "spin.py", "optimizer = torch.optim.RMSprop(", 1),
    ("linear schedule with 10% warmup", r"\text{warmup} = 0.1", "spin.py",
     "def schedule(step: int)", 4),
    ("2 epochs per iteration", r"\text{epochs} = 2", "machinery/recipes.py",
     "RECIPES = { >> num_train_epochs=2,  # the paper", 1),
    ("global batch 64", r"B = 64", "machinery/recipes.py", "RECIPES = { >> global_batch_size=64,",
     1),
    ("50k prompts of UltraChat 200k", r"N = 50{,}000", "machinery/recipes.py",
     "RECIPES = { >> max_samples=50_000,", 1),
    ("iteration t ≥ 1 trains on the synthetic data of iterations t − 1 and t",
     r"\mathcal{D}_t = \mathcal{D}'_{t-1} \cup "
     r"\mathcal{D}'_t", "spin.py", "train_pairs = pairs + (previous", 1),
    ("max_length 1024, max_prompt_length 512", r"T_{max} = 1024", "machinery/recipes.py",
     "RECIPES = { >> max_length=1024,", 2),
    ("sampling at temperature 1.0, top_p 1.0, 256 new "
     "tokens", r"\tau = 1", "machinery/recipes.py", "RECIPES = { >> max_new_tokens=256,", 3),
    ("bf16, gradient checkpointing, DeepSpeed "
     "ZeRO-3", r"", "machinery/recipes.py", "RECIPES = { >> bf16=True,", 3),
]


def excerpt(file: str, anchor: str, count: int) -> tuple[int, str, str]:
    """(1-based line, enclosing function, the lines) of the first line that contains anchor."""
    text = (ROOT / file).read_text()
    after, _, anchor = anchor.rpartition(" >> ")  # "A >> B": the first B after the first A
    # ValueError when the code changed: stale map
    start = text.index(anchor, text.index(after) if after else 0)
    line = text.count("\n", 0, start)
    lines = text.splitlines()
    function, depth = "module level", len(lines[line]) - len(lines[line].lstrip())
    if lines[line].lstrip().startswith("def "):  # the excerpt is a whole function
        depth = 0
    for ln in reversed(lines[:line]):  # outward through the enclosing blocks to the first def
        if ln.strip() and not ln.lstrip().startswith(")") and len(ln) - len(ln.lstrip()) < depth:
            depth = len(ln) - len(ln.lstrip())
            if ln.lstrip().startswith("def "):
                function = ln.strip().split("(")[0].replace("def ", "")
                break
    block = lines[line:line + count]
    indent = min(len(ln) - len(ln.lstrip()) for ln in block if ln.strip())
    return line + 1, function, "\n".join(ln[indent:] for ln in block)


def render() -> str:
    out = ["# The paper, mapped to the code", "",
           "Chen et al., *Self-Play Fine-Tuning Converts Weak Language Models to Strong Language "
           "Models*, ICML 2024,",
           "arXiv:2401.01335. Each entry: the LaTeX, then where the code computes it (file, line, "
           "function)",
           "and the lines themselves. Generated by `python -m docs.make_paper_map` from the files "
           "as they are;",
           "`tests/test_docs.py` fails when this page and the code disagree.",
           "",
           "Equation numbers: only Eq. 4.7 (the SPIN objective) is numbered here, checked against "
           "arXiv v3;",
           "the other pieces of Section 4 are named by their role, not by a number we could not "
           "check against",
           "the paper on this machine.", ""]
    for heading, latex, file, anchor, count in ENTRIES:
        if file is None:
            out += [heading, ""]
            continue
        line, function, code = excerpt(file, anchor, count)
        out += [f"### {heading}", ""]
        if latex:
            out += ["$$", latex, "$$", ""]
        where = f"`{file}:{line}`" + (f", in `{function}`" if function != "module level" else "")
        out += [where, "", "```python", code, "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    (ROOT / "docs" / "paper_map.md").write_text(render())
    print("wrote docs/paper_map.md")
