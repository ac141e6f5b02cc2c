"""rewardloop: fine-tune language models from human feedback, the whole loop in one tool.

Importing the package is cheap: nothing here imports torch, transformers, FastAPI or the
database layer. Import the submodule you need (``rewardloop.losses``, ``rewardloop.data.store``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
