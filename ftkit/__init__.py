"""ftkit: a config-driven fine-tuning toolkit for large language models.

Data flows one way: YAML -> ``ftkit.config`` -> ``ftkit.data`` + ``ftkit.models`` -> a stage
(``ftkit.train``, ``ftkit.merge``, ...) -> files on disk. ``ftkit.cli`` only parses and dispatches.
"""

__version__ = "0.1.0"

from ftkit.torchao_gate import defer_torchao  # noqa: E402

defer_torchao()  # transformers would import torchao on every model load: see ftkit.torchao_gate
