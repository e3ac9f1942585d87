"""``ftkit evaluate``: GSM8K scored exactly as lm-evaluation-harness 0.4.13 scores it, the user's own datasets
and the forgetting guard's general check, on a loaded model (ftkit's engine) or an OpenAI-compatible endpoint.

Read in data-flow order: ``benchmarks`` (what --benchmark names; ``gsm8k`` and ``own_data`` hold the two
kinds of data) -> ``backends`` / ``endpoint`` (where the prompts go) -> ``metrics`` (scores) ->
``outputs`` (samples.jsonl as it goes, results.json at the end, --resume) ; ``run`` wires them.
"""

from ftkit.evaluate.run import run_evaluation

__all__ = ["run_evaluation"]
