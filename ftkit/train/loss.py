"""The causal-LM loss, computed only where a label is trained, in chunks that never hold all logits.

Why by hand: for a small model the output head dominates memory. trl and the HF Trainer compute
``batch x seq x vocab`` logits for every token (49k x 4 bytes per token for SmolLM2, about 200 KB), keep
them and their gradient, and then throw most away because prompts are masked. Here the decoder's hidden
states are gathered at trained positions only, and the head + cross-entropy run over chunks of them
under activation checkpointing, so at most one chunk of logits exists at a time. The result is the same
sum of token losses (tested against the plain model loss).

Models whose heads post-process logits (soft-capping, scaling) and wrapped models (DDP, FSDP,
DeepSpeed, whose forward must run for gradient sync) take the plain path: the model's own forward
with ``logits_to_keep`` at the trained positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (position t is scored against token t + 1); -100 at the end."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model: torch.nn.Module) -> bool:
    """True when the decoder and the output head can be called separately without changing the result."""
    causal_lm = unwrap_causal_lm(model)
    if not hasattr(causal_lm, "get_decoder") or causal_lm.get_output_embeddings() is None:
        return False
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    return not any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_POSTPROCESSING)


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_loss_sum(model: torch.nn.Module, inputs: dict[str, Any], targets: torch.Tensor) -> torch.Tensor:
    """Sum of token losses at positions where ``targets`` != -100, holding one chunk of logits at a time."""
    causal_lm = unwrap_causal_lm(model)
    hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    trained = targets != -100
    hidden, flat_targets = hidden[trained], targets[trained]
    head = causal_lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_targets.numel(), CHUNK_TOKENS):
        piece = slice(start, start + CHUNK_TOKENS)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, hidden[piece], flat_targets[piece], head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hidden[piece], flat_targets[piece], head)
    return total


def plain_loss_sum(model: torch.nn.Module, inputs: dict[str, Any], targets: torch.Tensor) -> torch.Tensor:
    """The model's own forward, with logits kept only at positions some row trains on."""
    positions = (targets != -100).any(dim=0).nonzero().squeeze(-1)
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits.float()
    kept = targets[:, positions]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), kept.reshape(-1), ignore_index=-100, reduction="sum")
