"""Text-encoding stage: tokenizer + CLIP text encoder, batched, with long prompts in 75-token chunks.

Prompts longer than CLIP's 77-token window are never silently truncated. Like AUTOMATIC1111 (and the
``compel`` library), the token stream is cut into chunks of 75, each chunk is wrapped in start / end tokens
and padded to 77, encoded on its own, and the hidden states are concatenated along the sequence axis. The
negative prompt is padded with empty chunks to the same length. A prompt that fits one chunk is encoded
exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does.

A1111's prompt weighting (``models/prompt_weights.py``: ``(word:1.3)``, ``(word)``, ``[word]``, ``BREAK``)
applies on every API: each token's hidden state is multiplied by its weight and each chunk rescaled to its
original mean; ``BREAK`` starts a new chunk. The embedding cache is keyed by the parsed prompt, so spellings
that parse alike (``(cat)`` and ``(cat:1.1)``) share an entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, cast

import torch

from models.adapters.slots import TEXT_ENCODER_TARGETS, LoraBank
from models.contracts import EncodeRequest, PromptEmbeddings
from models.errors import PromptTooLongError
from models.prompt_weights import BREAK_WEIGHT, is_plain, parse_prompt
from models.snapshot import ModelSnapshot

# A1111's comma_padding_backtrack default: how far back a full chunk looks for a comma to cut at.
COMMA_BACKTRACK = 20
# A prompt ready to encode: its chunks of 77 token ids, and each token's weight (None: all 1, unweighted).
Tokens = tuple[list[list[int]], list[list[float]] | None]
# The text-encoder adapters a text is encoded with: (pinned reference, slot, scale) each; () for none.
TextAdapters = tuple[tuple[str, int, float], ...]


class TextEncoderStage:
    """Holds one model's tokenizer and text encoder; encodes batches of requests."""

    def __init__(
        self,
        name: str,
        snapshot: ModelSnapshot,
        device: torch.device,
        dtype: torch.dtype,
        max_prompt_tokens: int = 225,
        cache_size: int = 1024,
        lora_slots: int = 0,
        lora_max_rank: int = 64,
        loras_per_request: int = 4,
    ) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        self.name = name
        self.snapshot = snapshot
        self.device = device
        self.dtype = dtype
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = CLIPTokenizer.from_pretrained(snapshot.component_dir("tokenizer"))
        self.text_encoder: Any = cast(
            Any,
            CLIPTextModel.from_pretrained(
                snapshot.component_dir("text_encoder"), torch_dtype=dtype, use_safetensors=snapshot.use_safetensors
            ),
        )
        self.text_encoder.to(device)
        self.text_encoder.eval()
        self.window = self.tokenizer.model_max_length  # 77 for CLIP
        self.hidden_size = self.text_encoder.config.hidden_size
        self.chunk_tokens = self.window - 2  # room for the start and end tokens
        commas = self.tokenizer(",", add_special_tokens=False).input_ids
        self.comma_token: int | None = commas[0] if len(commas) == 1 else None
        # Text-encoder LoRAs: a fixed set of slots in CLIP's attention and MLP layers (``models/adapters``); one
        # forward pass has a text's chunks (BREAK may cut one per token).
        self.loras: LoraBank | None = None
        if lora_slots:
            self.loras = LoraBank(
                self.text_encoder, TEXT_ENCODER_TARGETS, lora_slots, lora_max_rank, loras_per_request,
                max_rows=max_prompt_tokens + 1, component="text encoder",
            )  # fmt: skip
        # (version, adapters as (reference, scale), parsed text)
        self._cache: OrderedDict[tuple[str, tuple[tuple[str, float], ...], str], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def version(self) -> str:
        return self.snapshot.version

    def loaded_modules(self) -> dict[str, str]:
        """Component name -> class name of what this stage holds in memory."""
        return {"tokenizer": type(self.tokenizer).__name__, "text_encoder": type(self.text_encoder).__name__}

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without start / end tokens and without truncation."""
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

    def _chunks(self, ids: list[int], weights: list[float] | None = None) -> Tokens:
        """Chunks of 75 tokens wrapped in start / end tokens and padded to 77 (a ``BREAK_WEIGHT`` entry in
        ``weights`` ends a chunk early), with the weights laid out the same way (1 for the special tokens).

        As A1111 does, a chunk that fills up within ``COMMA_BACKTRACK`` tokens after a comma is cut after that
        comma, and the words since move to the next chunk, so a phrase is not split across two chunks."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        marks = weights if weights is not None else [1.0] * len(ids)
        pieces: list[tuple[list[int], list[float]]] = [([], [])]
        last_comma = -1
        for token, weight in zip(ids, marks, strict=True):
            if weight == BREAK_WEIGHT:
                pieces.append(([], []))
                last_comma = -1
                continue
            tokens, kept = pieces[-1]
            if len(tokens) == self.chunk_tokens:
                moved: tuple[list[int], list[float]] = ([], [])
                if last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    moved = (tokens[cut:], kept[cut:])
                    del tokens[cut:], kept[cut:]
                pieces.append(moved)
                last_comma = -1
            if token == self.comma_token:
                last_comma = len(pieces[-1][0])
            pieces[-1][0].append(token)
            pieces[-1][1].append(weight)
        fill = [[pad] * (self.chunk_tokens - len(p)) for p, _ in pieces]
        chunks = [[bos, *p, eos, *f] for (p, _), f in zip(pieces, fill, strict=True)]
        if weights is None:
            return chunks, None
        return chunks, [[1.0, *w, 1.0] + [1.0] * len(f) for (_, w), f in zip(pieces, fill, strict=True)]

    def tokens(self, text: str, param: str) -> tuple[str, Tokens]:
        """(cache key, chunks) of a prompt, its weighting syntax parsed; refused when over the token limit."""
        fragments = parse_prompt(text)
        if is_plain(fragments):  # the text itself when it has no syntax (escapes and 1.0 weights removed)
            key = "".join(fragment for fragment, _ in fragments)
            ids, weights = self.token_ids(key), None
        else:
            ids, weights = [], []
            for fragment, weight in fragments:
                fragment_ids = [0] if weight == BREAK_WEIGHT else self.token_ids(fragment)
                ids += fragment_ids
                weights += [weight] * len(fragment_ids)
            key = repr(fragments)
        count = sum(1 for w in weights or [] if w == BREAK_WEIGHT)
        if len(ids) - count > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"{param} has {len(ids) - count} tokens; this service accepts at most {self.max_prompt_tokens}",
                param=param,
            )
        return key, self._chunks(ids, weights)

    @torch.inference_mode()
    def _encode_texts(
        self, texts: dict[tuple[TextAdapters, str], Tokens]
    ) -> dict[tuple[TextAdapters, str], torch.Tensor]:
        """Encode the prompts not in the cache; return (adapters, key) -> hidden states (77 * chunks, dim)."""
        out: dict[tuple[TextAdapters, str], torch.Tensor] = {}
        todo: list[tuple[tuple[TextAdapters, str], Tokens]] = []
        with self._lock:
            for entry, tokens in texts.items():
                cache_key = self._cache_key(*entry)
                cached = self._cache.get(cache_key)
                if cached is not None:
                    self._cache.move_to_end(cache_key)
                    out[entry] = cached
                    self.cache_hits += 1
                else:
                    todo.append((entry, tokens))
                    self.cache_misses += 1
        for entry, (chunks, weights) in todo:
            # One forward per text: a text's embedding must not depend on what else shares the batch, or
            # a cache hit and a fresh encode of the same prompt would give different images.
            input_ids = torch.tensor(chunks, dtype=torch.long, device=self.device)
            adapters = entry[0]
            if self.loras is not None:
                self.loras.set_rows([tuple((slot, scale) for _, slot, scale in adapters)] * len(chunks))
            elif adapters:
                raise ValueError("text-encoder adapters need lora_slots")
            z = self.text_encoder(input_ids)[0]
            if weights is not None:  # A1111: weight each token, then give each chunk back its mean
                multipliers = torch.tensor(weights, dtype=z.dtype, device=z.device).unsqueeze(-1)
                before = z.mean(dim=(1, 2), keepdim=True)
                z = z * multipliers
                z = z * (before / z.mean(dim=(1, 2), keepdim=True))
            emb = z.to("cpu").reshape(-1, self.hidden_size)
            out[entry] = emb
            with self._lock:
                self._cache[self._cache_key(*entry)] = emb
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def _cache_key(self, adapters: TextAdapters, key: str) -> tuple[str, tuple[tuple[str, float], ...], str]:
        # The slot an adapter sits in is where it is, not what it is: the cache keys on its pinned reference.
        return (self.version, tuple((ref, scale) for ref, _, scale in adapters), key)

    def _pad_to(self, emb: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
        missing = (length - emb.shape[0]) // self.window
        return torch.cat([emb] + [empty] * missing) if missing else emb

    def encode(
        self, requests: list[EncodeRequest], adapters: list[TextAdapters] | None = None
    ) -> list[PromptEmbeddings]:
        """Encode a batch of requests; prompts shared by several requests are encoded once.

        Args:
            adapters: per request, the text-encoder adapters it is encoded with (slots of ``self.loras``, filled
                by the caller). Like diffusers, an adapter applies to the negative prompt too.
        """
        per_request = adapters if adapters is not None else [()] * len(requests)
        empty_key, empty_tokens = self.tokens("", "prompt")
        texts: dict[tuple[TextAdapters, str], Tokens] = {}
        keys: list[tuple[tuple[TextAdapters, str], tuple[TextAdapters, str] | None]] = []
        for req, used in zip(requests, per_request, strict=True):
            texts[(used, empty_key)] = empty_tokens
            positive_key, tokens = self.tokens(req.prompt, "prompt")
            texts[(used, positive_key)] = tokens
            negative_entry = None
            if req.with_negative:
                negative_key, tokens = self.tokens(req.negative_prompt or "", "negative_prompt")
                negative_entry = (used, negative_key)
                texts[negative_entry] = tokens
            keys.append(((used, positive_key), negative_entry))
        embedded = self._encode_texts(texts)
        results = []
        for positive_entry, negative_entry in keys:
            empty = embedded[(positive_entry[0], empty_key)]
            positive = embedded[positive_entry]
            negative = embedded[negative_entry] if negative_entry is not None else None
            length = max(positive.shape[0], negative.shape[0] if negative is not None else 0)
            positive = self._pad_to(positive, length, empty)
            if negative is not None:
                negative = self._pad_to(negative, length, empty).unsqueeze(0)
            results.append(
                PromptEmbeddings(
                    model=self.name,
                    model_version=self.version,
                    positive=positive.unsqueeze(0),
                    negative=negative,
                )
            )
        return results
