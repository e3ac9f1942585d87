"""Where the prompts go: a model loaded here and run on ftkit's engine, or an OpenAI-compatible endpoint.

Both take the same ``PromptRequest`` list and call ``on_done`` once per finished request, in whatever order
they finish, so the stage writes each sample the moment it exists. Only the local backend scores text
(prompt log-probabilities for loss, perplexity and multiple choice): an endpoint's completions API does
not return them the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ftkit.errors import FtkitError


@dataclass
class PromptRequest:
    """One prompt: plain text, or chat ``messages`` the backend renders with the model's chat template."""

    key: int
    prompt: str = ""
    messages: list[dict[str, str]] | None = None


@dataclass
class Generation:
    """A finished request: the text (cut at the first stop string) and the prompt as it was sent."""

    key: int
    text: str
    prompt: str
    finish_reason: str | None = None


OnDone = Callable[[Generation], None]


class Backend(Protocol):
    """What the evaluation needs from a model: greedy generation, and (local only) prompt log-probabilities."""

    def describe(self) -> dict[str, Any]: ...

    def generate(self, requests: Sequence[PromptRequest], *, max_tokens: int, stop: Sequence[str],
                 on_done: OnDone) -> None: ...


class LocalBackend:
    """A model loaded with ``ftkit.models.load_for_inference`` and generated on ``ftkit.engine.LLMEngine``."""

    def __init__(self, model: str, adapters: Sequence[str], *, dtype: str, template: str = "auto",
                 trust_remote_code: bool = False) -> None:
        import torch

        from ftkit.engine import EngineOptions, LLMEngine
        from ftkit.models import LoadOptions, default_device, inference_dtype, load_for_inference, parse_dtype

        device = default_device()
        # fp32 on CPU unless asked: answers then agree with lm-eval run in fp32.
        auto = torch.float32 if device.type == "cpu" else inference_dtype(device)
        self.loaded = load_for_inference(model, list(adapters), template=template, dtype=parse_dtype(dtype, auto=auto),
                                         device=device, options=LoadOptions(trust_remote_code=trust_remote_code))
        self.tokenizer = self.loaded.tokenizer
        self.engine = LLMEngine.from_inference_model(self.loaded, EngineOptions(max_loras=0, pack_weights=True))
        self.model_name, self.adapters = model, list(adapters)

    @property
    def dtype_name(self) -> str:
        return str(self.loaded.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "adapters": self.adapters, "dtype": self.dtype_name, "backend": "ftkit engine"}

    def eos_texts(self) -> list[str]:
        """The EOS token as text (lm-eval adds it to ``until``)."""
        ids = sorted(self.engine.eos_token_ids)
        return [t for t in (self.tokenizer.decode([i], skip_special_tokens=False) for i in ids) if t]

    def render(self, request: PromptRequest) -> str:
        if request.messages is None:
            return request.prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise FtkitError(f"--apply-chat-template: the tokenizer of {self.model_name} has no chat template; pass "
                             "--template NAME or evaluate without --apply-chat-template.")
        return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids with no BOS or other special tokens added (lm-eval's HF model encodes prompts so)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[PromptRequest], *, max_tokens: int, stop: Sequence[str],
                 on_done: OnDone) -> None:
        from ftkit.engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(dict.fromkeys(stop)))
        keep = self.engine.max_model_len - max_tokens  # lm-eval keeps the prompt's last max_length - max_gen_toks
        if keep < 1:
            raise FtkitError(f"The model takes {self.engine.max_model_len} tokens in all, too few for {max_tokens} new "
                             "tokens after a prompt; use a model with a longer context.")
        prompts: dict[str, tuple[int, str]] = {}
        for request in requests:
            text = self.render(request)
            request_id = f"eval-{request.key}"
            prompts[request_id] = (request.key, text)
            self.engine.add_request(request_id, self.encode(text)[-keep:], params)
        while self.engine.has_unfinished_requests:
            for output in self.engine.step():
                if not output.finished:
                    continue
                if output.error:
                    raise FtkitError(f"Generation failed for item {prompts[output.request_id][0]}: {output.error}")
                key, text = prompts[output.request_id]
                completion = output.outputs[0]
                on_done(Generation(key, completion.text, text, completion.finish_reason))

    def prompt_logprobs(self, token_ids: Sequence[list[int]]) -> list[list[float]]:
        """For each token list, the log-probability of every token after the first given the ones before it."""
        from ftkit.engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.engine.generate([list(ids) for ids in token_ids], params)
        found = []
        for output in outputs:
            if output.error:
                raise FtkitError(f"Scoring failed: {output.error}")
            found.append([p.logprob for p in (output.prompt_logprobs or [])[1:] if p is not None])
        return found
