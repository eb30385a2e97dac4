"""The answers to docs/exercises.md in the names of docs/answers.py; docs/solutions/README.md says
why each holds. tests/test_exercises.py runs every check on these and sees it pass.
"""

# 1. Eq. 4.7 by hand
EX1_REAL_REWARD = 0.5  # 0.5·(−1 − (−2))
EX1_GENERATED_REWARD = -1.0  # 0.5·(−3 − (−1))
EX1_MARGIN = 1.5  # 0.5 − (−1)
EX1_LOSS = 0.2014  # log(1 + e^−1.5)

# 4. Identical answers teach nothing
EX4_GRADIENT = 0.0  # the two log-probs are the same function of θ: their difference has no gradient
EX4_WASTED_SHARE = 0.38  # Σ_y p_data(y)² = 0.5² + 0.3² + 0.2²

# 5. Theorem 5.4 across λ
EX5_LAMBDA_1 = "p_data"  # p_t·(p_data/p_t)^1
EX5_CLOSER = 2  # the exponent 1/λ is larger
EX5_ORDER_AT_HALF = "reversed"  # p_{t+1}/p_data ∝ (p_t/p_data)^{1 − 1/λ} = (p_t/p_data)^{−1}

# 6. The data of iteration t − 1
EX6_PAIRS_MIXED = 4000  # its own 2000 and iteration 0's 2000
EX6_PAIRS_UNMIXED = 2000

# 7. Greedy instead of sampled opponents
EX7_LIKELIER = "greedy"
EX7_GREEDY_DISTINCT = 1  # greedy decoding is a function of the prompt

# 8. A new convex ℓ: the exponential loss
EX8_LOSS_AT_FIXED_POINT = 1.0  # ℓ(0) = e^0
EX8_EXPONENT = 0.5  # u* = ½·log(A/B): half the logistic step

# 9. Why the first loss is exactly log 2
EX9_FIRST_LOSS = 0.6931  # ℓ(0) = log 2
EX9_FUNCTION = "disable_dropout"
EX9_OPPONENT_MODE = "eval"

# 10. Two iterations, read as data
EX10_FIRST_MARGIN = 0.0  # θ_1 is both the policy and the opponent at step 0 of iteration 1
EX10_STEPS_0 = 64  # ⌈2000/64⌉ = 32 steps an epoch, 2 epochs
EX10_STEPS_1 = 126  # ⌈4000/64⌉ = 63 steps an epoch, 2 epochs: not quite twice 64
