"""The training loop: the Trainer, one step's maths, the loss, optimizers and schedulers, progress and logs."""
