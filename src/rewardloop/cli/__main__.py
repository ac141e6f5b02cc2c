"""``python -m rewardloop.cli`` runs the command line."""

from rewardloop.cli import main

main()
