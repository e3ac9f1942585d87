"""``ftkit merge-lora``: fold LoRA adapters into their base and export a standalone, self-verified model.

``run`` is the recipe; ``checks`` what merging refuses beyond any export (an adapter trained on another
base). Staging, export checks, logit verification, the model card and the Modelfile are ``ftkit.export``'s.
"""

from ftkit.merge.run import MergeResult, run_merge

__all__ = ["MergeResult", "run_merge"]
