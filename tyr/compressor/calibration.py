"""Calibration data for the supernet: token blocks, chunking, and input Hessians (fp32).

The builder keeps the calibration hidden states [N, T, hidden] of the current module on the compute device (or in
host memory, recipe ``memory.hidden_states``) and walks them in chunks of whole sequences, each computed on the
device, so a module's activations (up to [N, T, ffn]) need not fit at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch

from tyr.compressor import distributed
from tyr.errors import TyrError

# Activations of one chunk stay below this; whole-module activations are kept between the Hessian pass and the
# propagation pass when they fit in CACHE_BYTES, else they are recomputed.
CHUNK_BYTES = 256 * 2**20
CACHE_BYTES = 1 * 2**30


def calibration_ids(tokenizer, source=None, num_sequences: int = 32, seq_len: int = 256, seed: int = 0,
                    purpose: str = "calibration") -> torch.LongTensor:
    """``num_sequences`` blocks of ``seq_len`` tokens from the calibration split of a text source (tyr.data); the
    search's selection blocks come from there too (``purpose`` names them in errors)."""
    from tyr.data import TextSource, load_text, token_blocks

    source = source if isinstance(source, TextSource) else TextSource.parse(source)
    try:
        return token_blocks(tokenizer, load_text(source, split="calibration"), seq_len, num_sequences, seed=seed)
    except ValueError as err:
        raise TyrError(f"{purpose} text ({source.describe()}): {err}") from err


def ids_digest(ids: torch.Tensor) -> str:
    """SHA-256 of the token ids (shape included), to recognise the same calibration data on resume."""
    ids = ids.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def tensors_digest(tensors: Iterator[torch.Tensor]) -> str:
    """SHA-256 of tensors' raw bytes (dtype-agnostic), e.g. to recognise the same dense weights on resume."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sequence_chunks(num_sequences: int, seq_len: int, width: int, chunk_bytes: int | None = None,
                    max_sequences: int | None = None) -> list[slice]:
    """Slices of whole sequences whose fp32 activations of ``width`` features stay within ``chunk_bytes``, of at
    most ``max_sequences`` sequences each."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_sequence = seq_len * width * 4
    size = max(1, min(num_sequences, chunk_bytes // max(per_sequence, 1), max_sequences or num_sequences))
    return [slice(start, min(start + size, num_sequences)) for start in range(0, num_sequences, size)]


class ModuleInputs:
    """One module's input activations (the input of o_proj or down_proj) over the calibration chunks of this rank.

    The chunks are the blocks that ranks share out (tyr.compressor.distributed): their boundaries depend only on
    the data and ``block_sequences``. ``hessian()`` makes one pass (H = XᵀX / tokens, fp32; each rank computes its
    chunks' sums, all ranks add every chunk's in chunk order); ``chunks()`` yields this rank's activations again,
    from memory when they fit in ``cache_bytes``, else recomputed from the hidden states.
    """

    def __init__(self, hidden: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor], width: int,
                 cache_bytes: int | None = None, chunk_bytes: int | None = None, block_sequences: int | None = None,
                 device: torch.device | None = None):
        self.hidden, self.activation, self.width = hidden, activation, width
        self.device = device if device is not None else hidden.device   # where chunks are computed
        self.slices = sequence_chunks(hidden.shape[0], hidden.shape[1], width, chunk_bytes, block_sequences)
        self.owned = distributed.owned(len(self.slices))
        owned_sequences = sum(self.slices[k].stop - self.slices[k].start for k in self.owned)
        fits = owned_sequences * hidden.shape[1] * width * 4 <= (CACHE_BYTES if cache_bytes is None else cache_bytes)
        self.cache: dict[int, torch.Tensor] | None = {} if fits else None

    def hessian(self) -> torch.Tensor:
        partials = {}
        for k in self.owned:
            a = self._activation(k)
            flat = a.reshape(-1, self.width)
            partials[k] = flat.T @ flat
            if self.cache is not None:
                self.cache[k] = a
        H = distributed.sum_in_order(partials, len(self.slices), (self.width, self.width), torch.float32,
                                     self.device)
        return H / (self.hidden.shape[0] * self.hidden.shape[1])

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for k in self.owned:
            sl = self.slices[k]
            yield sl, self.cache[k] if self.cache is not None else self._activation(k)

    def _activation(self, k: int) -> torch.Tensor:
        return self.activation(self.hidden[self.slices[k]].to(self.device)).to(torch.float32)
