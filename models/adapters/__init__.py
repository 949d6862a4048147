"""Adapters (LoRA) applied per request: file formats, device slots, host-memory store.

``lora.py`` reads diffusers / PEFT and kohya / A1111 files into one layout with diffusers' converters;
``slots.py`` holds a fixed number of adapters per model in static buffers so rows of one forward pass each get
their own adapters; ``store.py`` keeps converted adapters in host memory, read through the snapshot cache.
"""

from models.adapters.lora import AdapterError, LoraLayer, LoraWeights, read_lora
from models.adapters.slots import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraBank, SlotsBusy
from models.adapters.store import AdapterStore, LoadedAdapter

__all__ = [
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
    "AdapterError",
    "AdapterStore",
    "LoadedAdapter",
    "LoraBank",
    "LoraLayer",
    "LoraWeights",
    "SlotsBusy",
    "read_lora",
]
