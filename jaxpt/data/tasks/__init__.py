"""Generated tasks that every algorithm can train and evaluate on (no download)."""
