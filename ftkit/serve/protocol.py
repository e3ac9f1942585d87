"""OpenAI's chat/completions and completions requests as pydantic models, and what they ask of the engine.

Field types are strict (``"1"`` is not a number, ``1`` is not a boolean) and unknown fields are ignored,
as OpenAI's API ignores them. Fields that would change the result and that this server cannot honour
(tools, structured output, beam search, ...) are declared so that a request using them gets a 400 naming
the field instead of a silently different answer. vLLM's extras that benchmarks and lm-evaluation-harness
send (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``priority``,
``stop_token_ids``) are honoured.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ftkit.engine import SamplingParams

MAX_N = 128
MAX_LOGPROBS = 20
INT64 = 2**63


class APIError(Exception):
    """A request the server refuses: an OpenAI-style error body with ``status`` (400, 401, 404, 429, ...)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_exceeded", 500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients read (``error.message``, ``type``, ``param``, ``code``)."""
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# Fields OpenAI or vLLM define that change the answer and that this server does not implement, with the
# value that means "not used" (a request may send that value).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0), "prompt_embeds": (None,),
    "suffix": (None, ""), "chat_template": (None,), "continue_final_message": (None, False),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "truncate_prompt_tokens": (None,),
}


class _SamplingRequest(_Strict):
    """The fields chat and completions requests share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = Field(None, ge=-INT64, lt=INT64 - MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    priority: int = Field(0, ge=-INT64, lt=INT64)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # declared only to be refused when used (see _UNSUPPORTED)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    prompt_embeds: Any = None
    suffix: Any = None
    chat_template: Any = None
    continue_final_message: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    truncate_prompt_tokens: Any = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first field that asks for something this server does not do."""
        for name, unused in _UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value not in unused:
                raise APIError(400, f"{name} is not supported by this server (it serves plain text generation); "
                               "remove the field.", name)
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of {self.best_of} is not supported (only best_of == n); remove best_of.",
                           "best_of")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")

    def sampling_params(self, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        stop_token_ids: list[int], vocab_size: int) -> SamplingParams:
        """The engine's parameters for this request (``max_tokens`` already resolved by the caller)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens), ignore_eos=self.ignore_eos,
            stop=[s for s in stops if s], stop_token_ids=[*(self.stop_token_ids or []), *stop_token_ids],
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            logits_processors=[logit_bias_processor(self.logit_bias, vocab_size)] if self.logit_bias else [],
        )


def logit_bias_processor(bias: dict[str, float], vocab_size: int):
    """A logits processor adding OpenAI's ``logit_bias`` (token id as a string -> bias in [-100, 100])."""
    import torch

    ids, values = [], []
    for key, value in bias.items():
        if not key.isdigit() or not 0 <= int(key) < vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1}).",
                           "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias for token {key} must be between -100 and 100, got {value}.",
                           "logit_bias")
        ids.append(int(key))
        values.append(value)
    index, delta = torch.tensor(ids), torch.tensor(values)

    def add_bias(_generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, index.to(logits.device), delta.to(logits.device, logits.dtype))

    return add_bias


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; a non-text part (an image, audio) is a 400 naming it."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for position, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{index}].content[{position}] is of type {part.type!r}; this server "
                               "serves text-only models: send text parts only.", f"messages[{index}].content")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (``developer`` is the system role)."""
        if not self.messages:
            raise APIError(400, "messages is empty; send at least one message.", "messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise APIError(400, f"max_completion_tokens must be at least 1, got {self.max_completion_tokens}.",
                           "max_completion_tokens")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", "top_logprobs")

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids or lists of them."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = 16

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty; send a string, a list of strings or token ids.", "prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
