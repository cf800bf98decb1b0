"""Prompt checks that need only the tokenizer file (no torch): unknown words, truncation.

The API runs these before a job is queued, so a user learns at once that a word will be read
as the model's unknown token, or that the prompt is longer than the text encoder reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer


@dataclass(frozen=True)
class PromptCheck:
    unknown_words: list[str]
    truncated: bool


@lru_cache(maxsize=32)
def _tokenizer(tokenizer_dir: Path) -> tuple[Tokenizer, str | None, int] | None:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None  # slow (BPE vocab.json) tokenizers: byte-level BPE has no unknown words
    import json

    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    unk = config.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    return tok, unk, int(config.get("model_max_length", 77))


def check_prompt(tokenizer_dir: Path, prompt: str) -> PromptCheck:
    loaded = _tokenizer(Path(tokenizer_dir))
    if loaded is None:
        return PromptCheck([], False)
    tok, unk, max_length = loaded
    enc = tok.encode(prompt)
    unknown = []
    if unk is not None:
        for token, (start, end) in zip(enc.tokens, enc.offsets):
            word = prompt[start:end]
            if token == unk and word not in unknown:
                unknown.append(word)
    return PromptCheck(unknown, len(enc.ids) > max_length)
