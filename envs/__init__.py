"""tokenmem.envs: gymnasium MuJoCo tasks, D4RL normalisation and offline datasets.

Nothing ships here yet: the Decision Transformer work (its own issue) fills this package.
"""
