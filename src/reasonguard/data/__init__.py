"""Guard training data: sources (hub / local files), records read with their places,
validation, statistics and tokenization."""
