"""``ftkit serve``: an OpenAI-compatible HTTP server on ftkit's inference engine (or on vLLM).

Read in data-flow order: ``protocol`` (the requests OpenAI clients send, checked) -> ``served_models``
(which base or adapter a request's ``model`` names, with its chat template) -> ``generation`` (prompts
and sampling parameters for the engine, admission, streams) -> ``responses`` (OpenAI bodies and SSE
chunks) -> ``app`` (the routes, errors, API key) ; ``metrics`` is /metrics, ``run`` the stage (load,
bind, uvicorn, drain on SIGTERM), ``vllm_backend`` hands the same config to vLLM.
"""

from ftkit.serve.run import run_serve

__all__ = ["run_serve"]
