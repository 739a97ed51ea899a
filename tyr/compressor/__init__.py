"""compressor."""
