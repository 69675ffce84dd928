"""Leaderboards and paper tables rendered from run records; ``leaderboards/papers/`` holds the papers' numbers."""
