"""Calibration and evaluation text: sources, deterministic splits, token blocks."""

from tyr.data.blocks import token_blocks
from tyr.data.sources import SPLITS, Split, TextSource, load_text, wiki_articles

__all__ = ["SPLITS", "Split", "TextSource", "load_text", "token_blocks", "wiki_articles"]
