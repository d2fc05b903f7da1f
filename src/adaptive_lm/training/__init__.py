"""Training: the loop (``loop.train``), one update (``trainer.Trainer``), checkpoints, validation, distributed
training and the report. Built on ``core`` only."""
