"""Training machinery: the train state, optimizer and schedules, sharding, checkpoints, the train step.

The loop that drives them is :mod:`asff_jax.train`.
"""
