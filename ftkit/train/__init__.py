"""``ftkit train``: supervised fine-tuning and continued pre-training on the HF Trainer."""

from ftkit.train.run import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
