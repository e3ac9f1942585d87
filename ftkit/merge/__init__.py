"""``ftkit merge-lora``: fold LoRA adapters into their base and export a standalone, self-verified model.

``run`` is the recipe; ``checks`` what is refused before work starts; ``verify`` the logit self-check;
``card`` the training summary and README; ``modelfile`` the Ollama Modelfile.
"""

from ftkit.merge.run import MergeResult, run_merge

__all__ = ["MergeResult", "run_merge"]
