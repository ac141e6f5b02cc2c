"""Data model, store and file formats."""
