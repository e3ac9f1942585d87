"""The names a request's ``model`` may ask for: the base model and each LoRA adapter served beside it.

Every name has its own tokenizer for rendering chats: an adapter ``ftkit train`` saved carries the
tokenizer and chat template it was trained with, so a conversation for it is rendered exactly as its
training data was (``ftkit chat --adapter`` does the same); other adapters use the base's. Adapters are
loaded into the engine by name (multi-LoRA: never merged) and may be added or removed while serving
(vLLM's ``/v1/load_lora_adapter``), never while a request uses them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.engine.async_engine import AsyncEngine
from ftkit.errors import FtkitError
from ftkit.serve.protocol import APIError


@dataclass
class ServedName:
    """One servable name: the adapter it selects (None for the base) and the tokenizer its chats use."""

    name: str
    adapter: str | None
    tokenizer: Any
    path: str
    stop_token_ids: list[int] = field(default_factory=list)


def chat_stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a chat reply: eos and the template's end-of-turn token, as ``ftkit chat`` stops."""
    from ftkit.models import stop_token_ids

    return stop_token_ids(tokenizer)


def adapter_tokenizer(base_source: Any, base_tokenizer: Any, adapter_dir: Path, *, template: str,
                      trust_remote_code: bool) -> Any:
    """The tokenizer saved beside an adapter (with ``template`` applied), else the base's."""
    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.models import adapter_tokenizer_source, load_tokenizer

    source = adapter_tokenizer_source(base_source, [adapter_dir])
    if source is None:
        return base_tokenizer
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    apply_chat_template_to_tokenizer(tokenizer, template)
    return tokenizer


class ServedModels:
    """The base and its adapters by name, and how many requests use each adapter now."""

    def __init__(self, base_name: str, source: Any, tokenizer: Any, *, template: str = "auto",
                 trust_remote_code: bool = False) -> None:
        self.source = source
        self.base = ServedName(base_name, None, tokenizer, source.display or str(source.path),
                               chat_stop_token_ids(tokenizer))
        self.template, self.trust_remote_code = template, trust_remote_code
        self.adapters: dict[str, ServedName] = {}
        self.busy: Counter[str] = Counter()

    @property
    def names(self) -> list[ServedName]:
        return [self.base, *self.adapters.values()]

    def lookup(self, name: str | None) -> ServedName:
        """The served name a request asks for (no name: the base); a 404 naming the served ones otherwise."""
        if name is None or name == self.base.name:
            return self.base
        if name in self.adapters:
            return self.adapters[name]
        known = ", ".join(n.name for n in self.names)
        raise APIError(404, f"The model {name!r} does not exist on this server; it serves: {known}.", "model")

    def add_adapter(self, engine: Any, name: str, path: str) -> ServedName:
        """Load ``path`` into ``engine`` as ``name`` (call where the engine is not stepping)."""
        from ftkit.models import resolve_adapter_dir

        if name == self.base.name:
            raise FtkitError(f"Adapter name {name!r} is the base model's name; give the adapter another name.")
        adapter_dir = resolve_adapter_dir(path)
        engine.load_adapter(name, adapter_dir)
        tokenizer = adapter_tokenizer(self.source, self.base.tokenizer, adapter_dir, template=self.template,
                                      trust_remote_code=self.trust_remote_code)
        served = ServedName(name, name, tokenizer, str(path), chat_stop_token_ids(tokenizer))
        self.adapters[name] = served
        self._forget_evicted(engine)
        return served

    def _forget_evicted(self, engine: Any) -> None:
        """Drop names the engine evicted to make room (max_loras)."""
        for name in [n for n in self.adapters if n not in engine.adapters]:
            del self.adapters[name]

    async def load(self, front: AsyncEngine, name: str, path: str) -> None:
        """``/v1/load_lora_adapter``: load between engine steps; a bad adapter is a 400 with the loader's sentence."""
        if name in self.adapters:
            raise APIError(400, f"An adapter named {name!r} is already served; unload it first or pick another "
                           "name.", "lora_name")
        try:
            await front.between_steps(lambda: self.add_adapter(front.engine, name, path))
        except FtkitError as error:
            raise APIError(400, str(error), "lora_path") from None

    async def unload(self, front: AsyncEngine, name: str) -> None:
        """``/v1/unload_lora_adapter``: refused while a request uses the adapter."""
        if name not in self.adapters:
            raise APIError(404, f"No adapter named {name!r} is served.", "lora_name")
        if self.busy[name]:
            raise APIError(400, f"Adapter {name!r} is serving {self.busy[name]} request(s); unload it when idle.",
                           "lora_name")
        del self.adapters[name]
        await front.between_steps(lambda: front.engine.unload_adapter(name))
