"""A tiny byte-level BPE tokenizer built offline, for tests, the demo and tiny recipes.

Recipes name it ``tokenizer: tiny``. It is trained deterministically on a fixed corpus of the demo's
vocabulary (instructions, colors, shapes, positions), so nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["build_tiny_tokenizer", "TINY_SPECIAL_TOKENS", "TINY_CLIP_VISION_CONFIG"]

TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]

#: A 2-layer, 32-wide CLIP vision tower on 32 px images with 8 px patches (a 4x4 grid), random init; with
#: ``model_type: siglip_vision_model`` the same sizes give a tiny SigLIP tower.
TINY_CLIP_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}

_WORDS = (
    "red green blue yellow purple orange black white gray pink cyan brown "
    "circle square triangle star cross diamond ring bar heart "
    "small large big tiny left right top bottom center middle upper lower corner "
    "a an the of on in at is are with and to for what which where how many color shape size position object "
    "image photo picture scene caption text word question answer label class category find select retrieve "
    "represent given following matches everyday isolates portion region describe name identify "
    "cat dog car house tree person man woman child bird flower astronaut coffee rocket horse coins moon "
    "yes no one two three four five zero"
)
_SENTENCES = [
    "Represent the given image for classification.",
    "Represent the given image with the following question:",
    "Represent the given image.",
    "Find me an everyday image that matches the given caption:",
    "Find an image caption describing the given everyday image.",
    "Select the portion of the image that isolates the object of the given label:",
    "What color is the object? What shape is shown? Where is the object?",
    "a red circle on the left. a blue square at the top. a small green triangle in the center.",
    "Instruct: Query: Passage: The quick brown fox jumps over the lazy dog 0123456789.",
]


@lru_cache(maxsize=4)
def _build(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _SENTENCES + _WORDS.split() + [_WORDS]
    tok.train_from_iterator(corpus * 4, trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast`` with ``<pad> <unk> <s> </s>`` (pad, unk, bos, eos); ids stable across runs."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_build(vocab_size)),
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
