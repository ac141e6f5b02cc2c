"""Leaf helpers every layer may use: atomic file writes, progress bars, seeding.

Nothing here imports another rewardloop module, so any module can import it without creating an
upward edge (the import contract in pyproject.toml checks this).
"""
