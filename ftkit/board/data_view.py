"""The Data tab: the registered datasets and a few encoded examples with their trained spans, as
``ftkit data preview`` shows them in the terminal (the same registry, encoder and loss mask).

The dataset folder and the models a preview may use are the board's, not the request's: the folder given
at start (``--dataset-dir``), and the models the runs under the root were trained from plus ftkit's
default, so a request cannot make the board read an arbitrary path.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ftkit.board.runs import BoardError
from ftkit.config.template_names import FTKIT_TEMPLATE_NAMES
from ftkit.errors import FtkitError

PREVIEW_EXAMPLES = 3
PREVIEW_TEMPLATES = ["auto", *FTKIT_TEMPLATE_NAMES]  # "auto": the tokenizer's own, as training's default


class DataView:
    def __init__(self, dataset_dir: Path) -> None:
        self.dataset_dir = dataset_dir
        self._tokenizers: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def datasets(self) -> dict[str, Any]:
        """The registry's datasets: name, source, format, where, whether the file is here."""
        from ftkit.data.registry import load_registry, spec_from_entry

        try:
            registry_file, entries = load_registry(str(self.dataset_dir))
        except FtkitError as error:
            return {"dataset_dir": str(self.dataset_dir), "error": str(error), "datasets": []}
        rows = []
        for name in sorted(entries):
            try:
                spec = spec_from_entry(name, entries[name], registry_file)
            except FtkitError as error:
                rows.append({"name": name, "error": str(error)})
                continue
            local = spec.source == "file"
            rows.append({"name": name, "source": spec.source, "format": spec.formatting + (" (ranking)" if
                                                                                          spec.ranking else ""),
                         "location": Path(spec.location).name if local else spec.location,
                         "available": Path(spec.location).exists() if local else None})
        return {"dataset_dir": str(self.dataset_dir), "registry": str(registry_file), "datasets": rows}

    def preview(self, name: str, model: str, models: list[str], template: str = "auto") -> dict[str, Any]:
        """The first examples of dataset ``name`` encoded for ``model`` (one of ``models``) with ``template`` (one
        of ``PREVIEW_TEMPLATES``), spans marked."""
        from ftkit.config import TrainConfig, load_stage_config
        from ftkit.data.dataset import encode_dataset
        from ftkit.data.encoding import trained_spans
        from ftkit.data.options import DataOptions
        from ftkit.guard import system_prompt_variants

        if model not in models:
            raise BoardError(400, f"model {model!r} is not one the board previews with; pick one of: "
                             f"{', '.join(models)}.")
        if template not in PREVIEW_TEMPLATES:
            raise BoardError(400, f"template {template!r} is not one the board previews with; pick one of: "
                             f"{', '.join(PREVIEW_TEMPLATES)}.")
        names = {row["name"] for row in self.datasets()["datasets"]}
        if name not in names:
            raise BoardError(404, f"There is no dataset {name!r} in {self.dataset_dir}/dataset_info.json; pick one "
                             "the Data tab lists.")
        try:
            config = load_stage_config(TrainConfig, None, {
                "model_name_or_path": model, "dataset": name, "dataset_dir": str(self.dataset_dir),
                "template": template, "output_dir": str(self.dataset_dir / ".unused")}).config
            options = DataOptions.from_config(config)
            variants, _ = system_prompt_variants(config, options)  # as training encodes them
            with self._lock:
                tokenizer = self._tokenizer(config)
                examples, stats = encode_dataset(name, options, tokenizer, variants=variants)
        except FtkitError as error:
            raise BoardError(400, str(error)) from None
        shown = [{"tokens": len(example.input_ids), "trained": sum(1 for t in example.labels if t != -100),
                  "spans": trained_spans(tokenizer, example.input_ids, example.labels)}
                 for example in examples[:PREVIEW_EXAMPLES]]
        skipped = [{"reason": reason, "count": count} for reason, count in stats.conversion.skipped.most_common()]
        return {"name": name, "model": model, "template": template, "examples": shown,
                "stats": {"examples": stats.encoded, "records": stats.conversion.total, "skipped": skipped,
                          "truncated": stats.truncated, "tokens": stats.tokens, "trained_tokens": stats.trained_tokens}}

    def _tokenizer(self, config: Any) -> Any:
        from ftkit.data.templates import apply_chat_template_to_tokenizer
        from ftkit.models import load_tokenizer, model_source_from_config

        key = (config.model_name_or_path, config.template)
        if key not in self._tokenizers:
            tokenizer = load_tokenizer(model_source_from_config(config), trust_remote_code=False)
            apply_chat_template_to_tokenizer(tokenizer, config.template)
            self._tokenizers[key] = tokenizer
        return self._tokenizers[key]
