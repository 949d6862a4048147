"""Text-encoding stage: tokenizer + CLIP text encoder, batched, with long prompts in 75-token chunks.

Prompts longer than CLIP's 77-token window are never silently truncated. Like AUTOMATIC1111 (and the
``compel`` library), the token stream is cut into chunks of 75, each chunk is wrapped in start / end tokens
and padded to 77, encoded on its own, and the hidden states are concatenated along the sequence axis. The
negative prompt is padded with empty chunks to the same length. A prompt that fits one chunk is encoded
exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, cast

import torch

from models.contracts import EncodeRequest, PromptEmbeddings
from models.errors import PromptTooLongError
from models.snapshot import ModelSnapshot


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
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (version, text)
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

    def _chunks(self, ids: list[int]) -> list[list[int]]:
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        pieces = [ids[i : i + self.chunk_tokens] for i in range(0, len(ids), self.chunk_tokens)] or [[]]
        return [[bos, *p, eos] + [pad] * (self.chunk_tokens - len(p)) for p in pieces]

    def check_prompt(self, text: str, param: str) -> list[int]:
        ids = self.token_ids(text)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(
                f"{param} has {len(ids)} tokens; this service accepts at most {self.max_prompt_tokens}",
                param=param,
            )
        return ids

    @torch.inference_mode()
    def _encode_texts(self, texts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Encode the texts not in the cache; return text -> hidden states (77 * chunks, dim)."""
        out: dict[str, torch.Tensor] = {}
        todo: list[tuple[str, list[list[int]]]] = []
        with self._lock:
            for text, ids in texts.items():
                cached = self._cache.get((self.version, text))
                if cached is not None:
                    self._cache.move_to_end((self.version, text))
                    out[text] = cached
                    self.cache_hits += 1
                else:
                    todo.append((text, self._chunks(ids)))
                    self.cache_misses += 1
        for text, chunks in todo:
            # One forward per text: a text's embedding must not depend on what else shares the batch, or
            # a cache hit and a fresh encode of the same prompt would give different images.
            input_ids = torch.tensor(chunks, dtype=torch.long, device=self.device)
            emb = self.text_encoder(input_ids)[0].to("cpu").reshape(-1, self.hidden_size)
            out[text] = emb
            with self._lock:
                self._cache[(self.version, text)] = emb
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def _pad_to(self, emb: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
        missing = (length - emb.shape[0]) // self.window
        return torch.cat([emb] + [empty] * missing) if missing else emb

    def encode(self, requests: list[EncodeRequest]) -> list[PromptEmbeddings]:
        """Encode a batch of requests; texts shared by several requests are encoded once."""
        texts: dict[str, list[int]] = {"": []}
        for req in requests:
            texts[req.prompt] = self.check_prompt(req.prompt, "prompt")
            if req.with_negative:
                negative_text = req.negative_prompt or ""
                texts[negative_text] = self.check_prompt(negative_text, "negative_prompt")
        embedded = self._encode_texts(texts)
        empty = embedded[""]
        results = []
        for req in requests:
            positive = embedded[req.prompt]
            negative = embedded[req.negative_prompt or ""] if req.with_negative else None
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
