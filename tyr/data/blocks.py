"""Cut tokenized documents into fixed-length blocks for calibration and perplexity."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token before every text it encodes."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def token_blocks(tokenizer, documents: list[str], seq_len: int, num_blocks: int | None,
                 seed: int = 0) -> torch.LongTensor:
    """Return ``[num_blocks, seq_len]`` token ids.

    Documents are tokenized in order and joined with the tokenizer's EOS token as separator (so no block mixes
    two documents without a boundary marker); the stream is cut into consecutive non-overlapping blocks, and
    ``num_blocks`` of them are drawn with ``seed`` (kept in text order). ``num_blocks=None`` returns every block.
    When the tokenizer starts every text with its BOS token (Gemma's does), each block does too and holds
    ``seq_len - 1`` tokens of the stream: such models are trained that way and do much worse without it.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if num_blocks is not None and num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    separator = tokenizer.eos_token_id
    if separator is None:
        raise ValueError("the tokenizer has no EOS token to separate documents")
    stream: list[int] = []
    chunk = 64  # the fast tokenizers encode a list of documents in parallel
    starts = range(0, len(documents), chunk)
    for start in tqdm(starts, desc="tokenizing", unit="chunk", disable=len(starts) < 20, leave=False):
        encoded = tokenizer(documents[start:start + chunk], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if stream:
                stream.append(separator)
            stream.extend(ids)
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    body = seq_len - len(bos)
    available = len(stream) // body
    wanted = available if num_blocks is None else num_blocks
    if available < max(wanted, 1):
        raise ValueError(f"too little text: {len(documents)} documents give {len(stream)} tokens, enough for "
                         f"{available} blocks of {seq_len}, but {wanted} blocks ({wanted * seq_len} tokens) "
                         "were requested; use fewer or shorter blocks, or more text")
    blocks = torch.tensor(stream[: available * body], dtype=torch.long).view(available, body)
    if bos:
        blocks = torch.cat([torch.full((available, 1), bos[0], dtype=torch.long), blocks], dim=1)
    if wanted == available:
        return blocks
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:wanted].sort().values
    return blocks[chosen]
