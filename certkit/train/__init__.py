"""Certified robust training: models, IBP init, regularisers, ε schedule, the loop, datasets."""
