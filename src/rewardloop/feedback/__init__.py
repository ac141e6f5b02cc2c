"""Preference collection: tasks, simulated annotators, quality, selection."""
