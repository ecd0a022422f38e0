"""Models: fixed classifiers (with normalisation folded in), translators, and the defended pipeline."""
