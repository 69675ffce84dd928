"""Datasets (offline first, with download code kept for online users) and the fixed, hashed evaluation subsets."""
