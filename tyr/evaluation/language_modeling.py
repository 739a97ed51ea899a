"""Held-out perplexity and the KL divergence of a pruned model's next-token distributions from the dense one's."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Positions per log-softmax chunk: bounds the float32 temporaries to about chunk x vocab x 4 bytes per tensor.
POSITIONS_PER_CHUNK = 1024


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.LongTensor, batch_size: int = 4,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over every predicted token of ``blocks`` ([n, seq_len]).

    Each block is scored on its own (no context carried across blocks): seq_len - 1 predictions per block.
    """
    _check_blocks(blocks)
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        targets = batch[:, 1:]
        for logit_chunk, target_chunk in _position_chunks(logits, targets):
            total_nll += F.cross_entropy(logit_chunk.float(), target_chunk, reduction="sum").item()
            total_tokens += target_chunk.numel()
    return math.exp(total_nll / total_tokens)


def kl_to_reference(model: torch.nn.Module, reference_model: torch.nn.Module, blocks: torch.LongTensor,
                    batch_size: int = 1, progress: bool = True) -> float:
    """Mean KL(P_reference || Q_model) of the next-token distributions, in nats per token position.

    Averaged over every position of every block (seq_len distributions per block). The models may sit on
    different devices; logits are compared on the model's device in float32, a chunk of positions at a time.
    """
    return compare_to_reference(model, reference_model, blocks, batch_size, progress).kl


class ReferenceComparison(NamedTuple):
    kl: float                         # mean KL(P_reference || Q_model) per position, nats
    perplexity: float                 # the model's, as perplexity() computes it
    reference_perplexity: float


def compare_to_reference(model: torch.nn.Module, reference_model: torch.nn.Module, blocks: torch.LongTensor,
                         batch_size: int = 1, progress: bool = True) -> ReferenceComparison:
    """KL to the reference and both models' perplexities, from one forward pass of each model per batch."""
    return compare_all_to_reference([model], reference_model, blocks, batch_size, progress)[0]


@torch.no_grad()
def compare_all_to_reference(models: list[torch.nn.Module], reference_model: torch.nn.Module,
                             blocks: torch.LongTensor, batch_size: int = 1,
                             progress: bool = True) -> list[ReferenceComparison]:
    """``compare_to_reference`` for several models at once: the reference runs once per batch for all of them."""
    _check_blocks(blocks)
    reference_device = model_device(reference_model)
    kl, nll = [0.0] * len(models), [0.0] * len(models)
    total_positions, reference_nll, predicted_tokens = 0, 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc="KL to reference", unit="batch", disable=not progress,
                      leave=False):
        reference_logits = reference_model(input_ids=batch.to(reference_device)).logits
        targets = batch[:, 1:]
        reference_nll += _nll(reference_logits[:, :-1], targets.to(reference_device))
        for i, model in enumerate(models):
            device = model_device(model)
            logits = model(input_ids=batch.to(device)).logits
            if reference_logits.shape != logits.shape:
                raise ValueError(f"the models disagree on output shape: {tuple(reference_logits.shape)} (reference) "
                                 f"vs {tuple(logits.shape)}; they must share the vocabulary")
            for q_chunk, p_chunk in _position_chunks(logits, reference_logits.to(device)):
                log_q = F.log_softmax(q_chunk.float(), dim=-1)
                log_p = F.log_softmax(p_chunk.float(), dim=-1)
                kl[i] += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            nll[i] += _nll(logits[:, :-1], targets.to(device))
        total_positions += batch.numel()
        predicted_tokens += targets.numel()
    reference_perplexity = math.exp(reference_nll / predicted_tokens)
    return [ReferenceComparison(kl[i] / total_positions, math.exp(nll[i] / predicted_tokens), reference_perplexity)
            for i in range(len(models))]


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` ([batch, positions]) under ``logits``."""
    return sum(F.cross_entropy(logit_chunk.float(), target_chunk, reduction="sum").item()
               for logit_chunk, target_chunk in _position_chunks(logits, targets))


def _position_chunks(first: torch.Tensor, second: torch.Tensor):
    """Flatten [batch, positions, ...] pairs to positions and yield them in chunks of POSITIONS_PER_CHUNK."""
    first = first.reshape(-1, *first.shape[2:])
    second = second.reshape(-1, *second.shape[2:])
    for start in range(0, first.shape[0], POSITIONS_PER_CHUNK):
        yield first[start:start + POSITIONS_PER_CHUNK], second[start:start + POSITIONS_PER_CHUNK]


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a [num_blocks, seq_len>=2] tensor of token ids, got {tuple(blocks.shape)}")
