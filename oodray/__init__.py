"""oodray: distributed experiments for translation-based robustness.

An image-to-image translator T in front of a fixed classifier C maps out-of-distribution inputs (adversarial or
naturally shifted) back to the data distribution. oodray trains T with Ray Train, searches T with Ray Tune + Optuna
and evaluates C(T(.)) with AutoAttack fanned out as Ray tasks, against oblivious and adaptive attackers.
"""

__version__ = "0.1.0"
