"""Arithmetic on a model's parameters and gradients where ZeRO partitions them, shared by training (the
SAM family, the dual path) and evaluation (m-sharpness): the partitions a rank owns, and the ascent step
(direction, perturb, restore). Below both ``train`` and ``eval``, so neither imports the other for it."""
