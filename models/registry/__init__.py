"""Model registry: references, sources by URI scheme, manifests and the local snapshot cache.

A *reference* names a model version in some store (``file:///models/sd15``, ``s3://bucket/sd15@v3``,
``hf://acme/sd15@<commit>``). A *source* (one per scheme, see ``sources.SOURCES``) pins a reference to an
immutable revision, reads its manifest and fetches files. The *snapshot cache* turns a pinned reference into
a verified local folder in the diffusers layout, one component at a time, so each stage downloads only what
it reads.
"""

from models.registry.cache import FetchReport, SnapshotCache
from models.registry.errors import RegistryError
from models.registry.manifest import MANIFEST_NAME, Manifest, write_manifest
from models.registry.refs import ModelRef, parse_ref
from models.registry.sources import SOURCES, source_for

__all__ = [
    "MANIFEST_NAME",
    "SOURCES",
    "FetchReport",
    "Manifest",
    "ModelRef",
    "RegistryError",
    "SnapshotCache",
    "parse_ref",
    "source_for",
    "write_manifest",
]
