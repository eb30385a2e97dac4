"""Your answers to docs/exercises.md: replace a None by your answer, then run its check,
`python -m pytest -q tests/test_exercises.py -k exercise_N_` (N the exercise's number).

A check skips an exercise whose answers are still None, fails a wrong answer and passes a right
one. Numbers worked out by hand may be rounded to 3 decimals. Where a comment lists choices, the
answer is one of those strings, written exactly. Exercises 2 and 3 have no names here: you change
loss.py, and their checks run your code.
"""

# 1. Eq. 4.7 by hand (λ = 0.5 and the four log-probs of the exercise)
EX1_REAL_REWARD = None  # λ·log p_θ(y|x)/p_θt(y|x)
EX1_GENERATED_REWARD = None  # λ·log p_θ(y'|x)/p_θt(y'|x)
EX1_MARGIN = None  # t, the argument of ℓ
EX1_LOSS = None  # ℓ(t) = log(1 + e^−t)

# 4. Identical answers teach nothing
EX4_GRADIENT = None  # the largest |∂ℓ/∂θ| over the policy's parameters when y' = y
# the share of pairs with y' = y on a toy prompt "a+b" with a ≠ b, had p_θt reached p_data
EX4_WASTED_SHARE = None

# 5. Theorem 5.4 across λ (predict before you run the check: it prints p_{t+1} for each λ)
# where one step at λ = 1 lands: "p_t", "p_data" or "between p_t and p_data"
EX5_LAMBDA_1 = None
EX5_CLOSER = None  # which of λ = 2 and λ = 4 lands closer to p_data: 2 or 4
# at λ = 0.5, is the order of the responses by p_{t+1}/p_data the order by p_t/p_data
# ("same") or that order reversed ("reversed")?
EX5_ORDER_AT_HALF = None

# 6. The data of iteration t − 1 (the two commands of the exercise)
EX6_PAIRS_MIXED = None  # pairs that iteration 1 trains on, with the previous iteration mixed in
EX6_PAIRS_UNMIXED = None  # the same with --no-mix_previous_iteration

# 7. Greedy instead of sampled opponents
EX7_LIKELIER = None  # whose y' have the higher mean log p_θt(y'|x): "greedy" or "sampled"
EX7_GREEDY_DISTINCT = None  # distinct replies greedy decoding gives to one prompt asked 10 times

# 8. A new convex ℓ: the exponential loss
EX8_LOSS_AT_FIXED_POINT = None  # L_SPIN at θ = θ_t when p_θt = p_data, with ℓ(t) = e^−t
EX8_EXPONENT = None  # k in p_{t+1} ∝ p_t·(p_data/p_t)^{k/λ} for ℓ(t) = e^−t (logistic: k = 1)

# 9. Why the first loss is exactly log 2
EX9_FIRST_LOSS = None  # the loss of every iteration's first step
EX9_FUNCTION = None  # the name of the function in spin.py without which it would not be
EX9_OPPONENT_MODE = None  # the mode the opponent's log-probs are computed in: "train" or "eval"

# 10. Two iterations, read as data (python spin.py --iters 2 --output_dir runs/two)
EX10_FIRST_MARGIN = None  # the margin at step 0 of iteration 1
EX10_STEPS_0 = None  # optimizer steps of iteration 0 (lines in runs/two/iter0/metrics.jsonl)
EX10_STEPS_1 = None  # optimizer steps of iteration 1
