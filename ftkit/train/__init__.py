"""``ftkit train``: supervised fine-tuning and continued pre-training on the HF Trainer."""

from ftkit.train.run import TrainResult, launch_training, run_training

__all__ = ["TrainResult", "launch_training", "run_training"]
