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
    """``compare_to_reference`` for several models at once: the reference runs once per batch for all of them,
    and each model's log-probabilities serve both its KL and its perplexity."""
    _check_blocks(blocks)
    reference_device = model_device(reference_model)
    kl, nll = [0.0] * len(models), [0.0] * len(models)
    total_positions, reference_nll, predicted_tokens = 0, 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc="KL to reference", unit="batch", disable=not progress,
                      leave=False):
        log_p = _log_probs(reference_model(input_ids=batch.to(reference_device)).logits)
        reference_nll += _nll(log_p, batch)
        for i, model in enumerate(models):
            log_q = _log_probs(model(input_ids=batch.to(model_device(model))).logits)
            if log_q.shape != log_p.shape:
                raise ValueError(f"the models disagree on output shape: {tuple(log_p.shape)} (reference) "
                                 f"vs {tuple(log_q.shape)}; they must share the vocabulary")
            for q_chunk, p_chunk in _position_chunks(log_q, log_p.to(log_q.device)):
                kl[i] += F.kl_div(q_chunk, p_chunk, log_target=True, reduction="sum").item()
            nll[i] += _nll(log_q, batch)
        total_positions += batch.numel()
        predicted_tokens += batch[:, 1:].numel()
    reference_perplexity = math.exp(reference_nll / predicted_tokens)
    return [ReferenceComparison(kl[i] / total_positions, math.exp(nll[i] / predicted_tokens), reference_perplexity)
            for i in range(len(models))]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[batch, positions, vocab] logits -> float32 log-probabilities of the same shape, a chunk at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    chunks = [F.log_softmax(flat[i:i + POSITIONS_PER_CHUNK].float(), dim=-1)
              for i in range(0, flat.shape[0], POSITIONS_PER_CHUNK)]
    return torch.cat(chunks).view(*logits.shape)


def _nll(log_probs: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed negative log-likelihood of each block's next tokens under ``log_probs`` [batch, positions, vocab]."""
    targets = batch[:, 1:, None].to(log_probs.device)
    return -log_probs[:, :-1].gather(-1, targets).sum().item()


def _position_chunks(first: torch.Tensor, second: torch.Tensor):
    """Flatten [batch, positions, ...] pairs to positions and yield them in chunks of POSITIONS_PER_CHUNK."""
    first = first.reshape(-1, *first.shape[2:])
    second = second.reshape(-1, *second.shape[2:])
    for start in range(0, first.shape[0], POSITIONS_PER_CHUNK):
        yield first[start:start + POSITIONS_PER_CHUNK], second[start:start + POSITIONS_PER_CHUNK]


def _check_blocks(blocks: torch.Tensor) -> None:
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a [num_blocks, seq_len>=2] tensor of token ids, got {tuple(blocks.shape)}")
