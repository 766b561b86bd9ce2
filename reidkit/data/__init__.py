"""Datasets: specs, preparation, synthetic data and loading."""
