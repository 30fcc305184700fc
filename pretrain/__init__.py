"""The training program: config, model, objectives, trainer, checkpoints, metrics. Run `python -m pretrain`."""
