"""What on-policy algorithms share: their config keys, prompt rows, rollouts (prompts ->
samples -> rewards -> advantages, the estimator a parameter), typed rollout rows in two
layouts (flat or one shared-prompt row per group), the rollout source (buffer, mini-batches
x iterations, DAPO dynamic sampling), the SFT+RL hybrids, named random streams, held-out
evaluation, and the scoring of frozen policies (the reference model, the old policy) that
DPO uses too. None of it knows a loss.
"""
