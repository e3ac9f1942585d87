"""The chat template names a config may use, as plain names: ``ftkit validate`` refuses an unknown one.

The Jinja templates themselves live in ``ftkit.data.templates``, which renders conversations; this module
holds only the names (ftkit's own and LLaMA-Factory's), so that the config checks them without importing
the data layer or transformers, and both layers refuse an unknown name with the same sentence.
"""

from __future__ import annotations

import difflib

FTKIT_TEMPLATE_NAMES: tuple[str, ...] = ("alpaca", "chatml", "default", "llama3", "mistral", "qwen")
"""The templates ftkit ships (``ftkit.data.templates`` holds their Jinja text), sorted."""

LLAMAFACTORY_TO_FTKIT: dict[str, str] = {
    "alpaca": "alpaca",
    "chatml": "chatml",
    "default": "default",
    "empty": "default",
    "llama3": "llama3",
    "mistral": "mistral",
    "qwen": "qwen",
    "qwen2_vl": "qwen",
}
"""LLaMA-Factory template names that correspond to one of ftkit's."""

LLAMAFACTORY_TOKENIZER_OWN: frozenset[str] = frozenset(
    {
        "aquila", "atom", "baichuan", "baichuan2", "bailing", "bailing_v2", "belle", "bluelm", "breeze",
        "chatglm2", "chatglm3", "chatml_de", "codegeex2", "codegeex4", "cohere", "cpm", "cpm3", "cpm4", "dbrx",
        "deepseek", "deepseek3", "deepseekr1", "deepseekcoder", "dots_ocr", "ernie", "ernie_nothink",
        "ernie_vl", "exaone", "falcon", "falcon_h1", "fewshot", "gemma", "gemma2", "gemma3", "gemma3n", "glm4",
        "glm4_moe", "glm4v", "glm4_1v", "glm4_5v", "glmz1", "gpt_oss", "granite3", "granite3_vision",
        "granite4", "hunyuan", "index", "intern", "intern2", "intern_vl", "intern_s1", "keye_vl", "kimi_vl",
        "lfm2", "llama2", "llama2_zh", "llama4", "mllama", "moonlight", "llava", "llava_next",
        "llava_next_llama3", "llava_next_mistral", "llava_next_qwen", "llava_next_yi", "llava_next_video",
        "llava_next_video_mistral", "llava_next_video_yi", "marco", "mimo", "mimo_v2", "mimo_vl", "minicpm_v",
        "minicpm_o", "minimax1", "minimax2", "ministral", "mistral_small", "ministral3", "olmo", "openchat",
        "openchat-3.6", "opencoder", "orion", "paligemma", "paligemma_chat", "phi", "phi_small", "phi4",
        "phi4_mini", "pixtral", "qwen3", "qwen3_nothink", "qwen2_audio", "qwen2_omni", "qwen3_omni",
        "qwen3_omni_nothink", "qwen3_vl", "qwen3_vl_nothink", "sailor", "seed_coder", "seed_oss", "skywork_o1",
        "smollm", "smollm2", "solar", "starchat", "telechat", "telechat2", "vicuna", "video_llava", "xuanyuan",
        "xverse", "yayi", "yi", "yi_vl", "yuan", "zephyr", "ziya"
    }
)
"""LLaMA-Factory template names whose models ship their own chat template: ftkit uses the tokenizer's."""

MODELS_OWN_FORMAT: frozenset[str] = frozenset({"smollm", "smollm2"})
"""Of those, the ones that are simply the model's own format (no reason to mention a substitution)."""


def is_known_template(name: str) -> bool:
    """Whether ``template: name`` names a template (``auto``, ftkit's or LLaMA-Factory's; any case)."""
    key = name.strip().lower()
    return (key == "auto" or key in FTKIT_TEMPLATE_NAMES or key in LLAMAFACTORY_TO_FTKIT
            or key in LLAMAFACTORY_TOKENIZER_OWN)


def unknown_template_message(name: str) -> str:
    """The sentence that refuses an unknown template name, with a did-you-mean."""
    key = name.strip().lower()
    # Our own names first: "chatlm" should suggest chatml, not LLaMA-Factory's chatglm3.
    close = difflib.get_close_matches(key, ["auto", *FTKIT_TEMPLATE_NAMES], n=1) or difflib.get_close_matches(
        key, [*LLAMAFACTORY_TO_FTKIT, *sorted(LLAMAFACTORY_TOKENIZER_OWN)], n=1
    )
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"Unknown template '{name}'{hint}; ftkit templates are auto, {', '.join(FTKIT_TEMPLATE_NAMES)}, "
        "and LLaMA-Factory template names are accepted too."
    )
