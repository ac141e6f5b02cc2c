"""Evaluation: win rates, KL, ratings, reports."""
