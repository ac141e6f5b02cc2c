"""The annotation server (FastAPI). Nothing outside app/ imports it."""
