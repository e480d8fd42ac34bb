"""Guard training data: sources (hub / local files), validation, statistics and tokenization."""
