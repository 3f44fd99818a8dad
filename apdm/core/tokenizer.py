"""Build a real :class:`transformers.CLIPTokenizer` offline, for tiny test pipelines and the toy world.

Stable Diffusion's tokenizer is CLIP's byte-level BPE. Its vocabulary cannot be downloaded here, so we write
``vocab.json`` + ``merges.txt`` in CLIP's exact format for a *small* vocabulary: every byte character (with and
without the end-of-word marker ``</w>``), one whole-word token per listed word, the merges that build those
words left to right, and CLIP's two special tokens. Text outside the word list still tokenizes (into
characters), so any prompt works; listed words become single tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

#: words every apdm tiny/toy tokenizer knows, so prompts of the field tokenize to whole words.
BASE_WORDS = (
    "a an the of photo portrait picture dslr high quality close up in on at with and wearing person man woman "
    "dog cat face sks skss zwx painting drawing style art city beach forest background snow park street "
    "smiling red blue green yellow black white brown"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair (all its occurrences)."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def write_clip_vocab(words, out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for a word-level CLIP BPE vocabulary.

    Args:
        words: iterable of lower-case words (ASCII letters/digits recommended).
        out_dir: folder to write into (created).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words if w):
        # Append merges until BPE (with every merge so far) turns the word into a single token. Appended
        # merges rank last, so words already handled keep tokenizing exactly as before.
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                vocab.append(pair[0] + pair[1])
                seen.add(pair[0] + pair[1])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_tokenizer(words=(), out_dir: str | Path | None = None, model_max_length: int = 77):
    """A real ``CLIPTokenizer`` knowing :data:`BASE_WORDS` plus ``words`` as whole-word tokens.

    Args:
        words: extra vocabulary (e.g. the toy world's caption words).
        out_dir: where to keep the vocabulary files; when ``None`` they go to a temporary folder that is removed
            once the tokenizer has read them (it keeps its vocabulary in memory; ``save_pretrained`` works).
        model_max_length: sequence length (77 as in Stable Diffusion).
    """
    import tempfile

    from transformers import CLIPTokenizer

    def make(folder: Path):
        write_clip_vocab(list(BASE_WORDS) + list(words), folder)
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                             model_max_length=model_max_length, pad_token="<|endoftext|>")

    if out_dir is not None:
        return make(Path(out_dir))
    with tempfile.TemporaryDirectory(prefix="apdm-tok-") as tmp:
        return make(Path(tmp))
