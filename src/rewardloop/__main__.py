"""``python -m rewardloop`` runs the command line."""

from rewardloop.cli import main

main()
