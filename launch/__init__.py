"""Launching: torchrun and Slurm scripts, and `python -m launch --dry-run` for checking a layout."""
