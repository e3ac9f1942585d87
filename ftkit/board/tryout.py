"""The Try box: chat with a finished run's model, as ``ftkit chat --adapter`` does.

The run's base (from its config) is loaded with its adapter through ``ftkit.models.load_for_inference``,
prompted with the tokenizer and template saved beside the adapter, and answered by the inference
engine (``ftkit.engine.replies``). One model is kept loaded (the last run chatted with); one question is
answered at a time (one engine step uses every core of a CPU anyway), and a second asked meanwhile is
told the box is busy rather than holding one of the server's threads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from ftkit.board.runs import BoardError, read_config, run_state
from ftkit.errors import FtkitError
from ftkit.run_files import ADAPTER_CONFIG_FILE, RUN_RESULTS_FILE

MAX_MESSAGES = 64
MAX_CHARACTERS = 20000


class Tryout:
    def __init__(self) -> None:
        self._loaded: tuple[tuple[str, float], Any] | None = None
        self._lock = threading.Lock()

    def reply(self, folder: Path, messages: Any, max_new_tokens: int = 256) -> str:
        """The model's answer to ``messages`` (OpenAI-style ``[{"role", "content"}]``, last one the user's)."""
        from ftkit.engine.replies import generate_replies

        conversation = _checked_messages(messages)
        if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= 2048:
            raise BoardError(400, "max_new_tokens must be a whole number from 1 to 2048.")
        state, _ = run_state(folder)
        if state != "finished":
            raise BoardError(409, f"The run is {state}; the Try box answers with a finished run's model.")
        if not self._lock.acquire(blocking=False):
            raise BoardError(409, "The Try box is answering another question; ask again in a moment.")
        try:
            loaded = self._model(folder)
            reply = generate_replies(loaded.model, loaded.tokenizer, [conversation], max_new_tokens=max_new_tokens)[0]
        finally:
            self._lock.release()
        return reply.text

    def _model(self, folder: Path) -> Any:
        from ftkit.models import load_for_inference

        resolved = folder.resolve()
        try:
            key = (str(resolved), (resolved / RUN_RESULTS_FILE).stat().st_mtime)
        except OSError:
            raise BoardError(409, "The run's results are gone (was its folder deleted?).") from None
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None  # free the previous model first
        config = read_config(resolved)
        template = str(config.get("template") or "auto")
        try:
            if (resolved / ADAPTER_CONFIG_FILE).is_file():
                base = config.get("model_name_or_path")
                if not base:
                    raise BoardError(409, "The run's config does not name its base model; chat with it through "
                                     "ftkit chat --model BASE --adapter RUN.")
                loaded = load_for_inference(str(base), [resolved], template=template)
            elif (resolved / "config.json").is_file():
                loaded = load_for_inference(str(resolved), template=template)
            else:
                raise BoardError(409, "The run saved no model or adapter to chat with.")
        except BoardError:
            raise
        except FtkitError as error:
            raise BoardError(409, f"The run's model cannot be loaded: {error}") from None
        except Exception as error:  # a damaged adapter or model file: peft, safetensors or torch say why
            raise BoardError(409, f"The run's model cannot be loaded ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else 'no message'}).") from None
        self._loaded = (key, loaded)
        return loaded


def _checked_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BoardError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects.")
    if len(messages) > MAX_MESSAGES:
        raise BoardError(400, f"messages holds {len(messages)} turns; the Try box takes at most {MAX_MESSAGES}.")
    checked, characters = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
                or not isinstance(message.get("content"), str):
            raise BoardError(400, f"messages[{index}] must be {{\"role\": system|user|assistant, \"content\": "
                             "text}.")
        characters += len(message["content"])
        checked.append({"role": message["role"], "content": message["content"]})
    if characters > MAX_CHARACTERS:
        raise BoardError(400, f"The conversation has {characters:,} characters; the Try box takes at most "
                         f"{MAX_CHARACTERS:,}.")
    if checked[-1]["role"] != "user":
        raise BoardError(400, "The last message must be the user's.")
    return checked
