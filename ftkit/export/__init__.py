"""Exporting a model to disk, for every stage that writes one (``ftkit merge-lora``; next, ``ftkit quantize``).

- ``checks``: what an export refuses before and while it is written (export_dir, shard plan, free space).
- ``staging``: the hidden staging folder renamed into place only after the checks passed (``staged_export``).
- ``verify``: logit self-verification of the files against the model they came from.
- ``card``: the README.md model card (and what an adapter's folder records about its training).
- ``modelfile``: the Ollama Modelfile translated from the chat template.
"""
