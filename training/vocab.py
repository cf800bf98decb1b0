"""The fixed word vocabulary of the synthetic "shapes" domain, and a word-level tokenizer over it.

CLIP's BPE vocabulary cannot be downloaded here, so our text encoders use a word-level
tokenizer built with `tokenizers` and wrapped in `PreTrainedTokenizerFast`: it saves and
reloads through `AutoTokenizer` and diffusers pipelines like any CLIP tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
SIZES = ["small", "large", "big", "tiny"]
POSITIONS = ["left", "right", "top", "bottom", "center", "middle"]
BACKGROUNDS = ["white", "black", "gray", "grey"]
FUNCTION_WORDS = [
    "a", "an", "the", "on", "in", "at", "of", "and", "with", "to", "is", "background",
    "side", "corner", "image", "picture", "photo", "drawing", "shape", "object", "one", "two",
    "circles", "squares", "triangles", "stars", "colored", "centered", "placed", "above",
    "below", "next", "beside", ",", ".",
]

BOS, EOS, UNK, PAD = "<|startoftext|>", "<|endoftext|>", "<unk>", "<pad>"
# CLIP pools the first EOS token when config.eos_token_id != 2 (else it falls back to argmax
# pooling), so the specials are laid out to give EOS the id 1.
SPECIALS = [BOS, EOS, UNK, PAD]


def words() -> list[str]:
    seen: dict[str, None] = {}
    for word in SHAPES + COLORS + SIZES + POSITIONS + BACKGROUNDS + FUNCTION_WORDS:
        seen.setdefault(word, None)
    return list(seen)


def build_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that wraps prompts in BOS ... EOS and pads with PAD."""
    vocab = {token: i for i, token in enumerate(SPECIALS + words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
    )
