"""An offline CLIP tokenizer for the `tiny` preset: byte-level BPE files generated here, no download.

The tiny model is randomly initialised, so its tokenizer only has to be a *valid* CLIP tokenizer
(same normaliser, pre-tokeniser, special tokens and byte-level alphabet), not OpenAI's 49k-token
vocabulary. The vocabulary is the 256 byte symbols, the same with CLIP's end-of-word suffix `</w>`,
and the two special tokens, with no merges: every word is spelled out symbol by symbol. Any text
therefore encodes without an unknown token and decodes back (lower-cased, as CLIP normalises it).
The files are written in Hugging Face format and loaded through `CLIPTokenizer.from_pretrained`,
the same path a real checkpoint directory takes.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's context length: prompts plus prompt-tuning context must fit in it.
MAX_LENGTH = 77


@cache
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2/CLIP's bytes-to-unicode table: one printable character per byte value, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return tuple(chr(chars[b]) for b in range(256))


def tiny_vocab() -> dict[str, int]:
    """Byte symbols, then the same with `</w>`, then BOS and EOS (EOS has the highest id, as in CLIP)."""
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_tiny_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json (a Hugging Face tokenizer directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def build_tiny_tokenizer():  # -> transformers.CLIPTokenizer
    """A `CLIPTokenizer` over the generated files; the temporary directory is gone on return."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="ds_trainer_tiny_tokenizer_") as tmp:
        return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer_files(tmp)))
