"""A CLIP-style byte-level BPE vocabulary built locally, for test models.

Real CLIP ships a 49,408-entry vocabulary learned on web text; it cannot be downloaded here, so test models
carry a vocabulary learned from a small built-in corpus of prompt words. The file layout (``vocab.json``,
``merges.txt``, ``<|startoftext|>`` / ``<|endoftext|>``) and the token order (256 byte symbols, the same with
``</w>``, then merges, then the two specials) are CLIP's, so ``CLIPTokenizer`` loads it unchanged.
"""

from __future__ import annotations

import collections
import functools
import itertools

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words that show up in image prompts; repeated words get merged into whole-word tokens first.
_CORPUS = """
a photo of an astronaut riding a horse on mars, highly detailed, digital art, trending on artstation
portrait of a cat wearing a hat, studio lighting, sharp focus, 8k, octane render, cinematic
a painting of a beautiful landscape with mountains and a lake at sunset, oil on canvas, by a master
a cute dog sitting in a field of flowers, bokeh, golden hour, photorealistic, high quality
futuristic city skyline at night, neon lights, cyberpunk, rain, reflections, concept art, illustration
an old man with a beard, dramatic lighting, black and white, film grain, close up, detailed face
a castle on a hill in a fantasy world, epic, matte painting, volumetric light, clouds, blue sky
low quality, blurry, worst quality, bad anatomy, extra fingers, deformed, ugly, watermark, text
a bowl of fruit on a wooden table, still life, soft light, red apple, green pear, yellow banana
anime girl with long hair, school uniform, cherry blossoms, spring, vibrant colors, masterpiece
a robot in a forest, moss, ruins, morning fog, unreal engine, wide angle, ultra realistic
the ocean with waves crashing on the rocks, storm, lighthouse, dark clouds, long exposure
a red sports car on a desert road, motion blur, dust, summer, professional photography
a cozy living room with a fireplace, interior design, warm light, plants, wooden floor
"""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _words(text: str) -> list[str]:
    byte_map = bytes_to_unicode()
    out = []
    for raw in text.lower().replace(",", " , ").split():
        out.append("".join(byte_map[b] for b in raw.encode("utf-8")))
    return out


def learn_merges(max_merges: int, min_count: int = 1) -> list[tuple[str, str]]:
    """Learn BPE merges from the built-in corpus, deterministically (ties break lexicographically)."""
    counts = collections.Counter(_words(_CORPUS))
    # Each word is a tuple of symbols; the last one carries CLIP's end-of-word marker.
    words = {(*tuple(w[:-1]), w[-1] + "</w>"): c for w, c in counts.items()}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < min_count:
            break
        pair = best[0]
        merges.append(pair)
        merged = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged
    return merges


def build_vocab(max_merges: int = 2000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return ``(vocab, merges)`` in CLIP's token order."""
    merges = learn_merges(max_merges)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges
