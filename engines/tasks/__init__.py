"""Tasks: each composes a loaded model's pieces into one generation mode, as numbered steps."""
