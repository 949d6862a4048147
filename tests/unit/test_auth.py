"""API keys: the key file, rotation, how keys are presented; image ids scoped to a tenant."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from serving.auth import (
    OPEN,
    KeyFileError,
    KeyRing,
    Principal,
    act_as,
    current,
    hash_key,
    parse_key_file,
    presented_key,
    reset_principal,
)
from serving.outputs import new_image_id, owned


def key_file(path: Path, *entries: tuple[str, str, str]) -> Path:
    lines = ["keys:"] + [f"  - id: {i}\n    tenant: {t}\n    sha256: {hash_key(k)}" for i, t, k in entries]
    path.write_text("\n".join(lines) + "\n")
    return path


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_keys_verify_by_hash_and_rotate_without_a_restart(tmp_path: Path) -> None:
    path = key_file(tmp_path / "keys.yaml", ("a1", "team-a", "key-a"), ("b1", "team-b", "key-b"))
    assert "key-a" not in path.read_text()  # only hashes are stored
    clock = Clock()
    ring = KeyRing(str(path), interval_s=5, clock=clock)
    assert ring.verify("key-a") == Principal("team-a", "a1")
    assert ring.verify("key-b") == Principal("team-b", "b1")
    assert ring.verify("nope") is None and ring.verify(None) is None and ring.verify("") is None
    key_file(path, ("a2", "team-a", "key-a2"))  # rotate: key-a and key-b revoked, key-a2 added
    os.utime(path, (1000, 1000))
    clock.now = 6
    assert ring.verify("key-a") is None and ring.verify("key-a2") == Principal("team-a", "a2")
    path.write_text("keys:\n  - id: broken\n    tenant: [\n")  # a bad edit keeps the keys in force
    os.utime(path, (2000, 2000))
    clock.now = 12
    assert ring.verify("key-a2") == Principal("team-a", "a2") and ring.reload_error


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("keys:\n  - id: a\n    tenant: t\n    sha256: short\n", "line 2"),
        ("keys:\n  - id: a\n    tenant: t\n    sha256: " + "ab" * 32 + "\n  - id: b\n    tenant: ''\n", "line 5"),
        ("keys: [\n", "line 2"),
    ],
)
def test_a_bad_key_file_names_the_line(text: str, where: str) -> None:
    with pytest.raises(KeyFileError, match=where):
        parse_key_file(text)


def test_a_bad_key_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("keys:\n  - id: a\n")
    with pytest.raises(KeyFileError, match="line 2"):
        KeyRing(str(tmp_path / "keys.yaml"))


def test_presented_keys() -> None:
    assert presented_key("Bearer abc") == "abc"
    assert presented_key("bearer  abc ") == "abc"
    basic = base64.b64encode(b"anyone:the-key").decode()
    assert presented_key(f"Basic {basic}") == "the-key"
    assert presented_key("Basic !!!") is None
    assert presented_key(f"Basic {base64.b64encode(b'no-colon').decode()}") is None
    assert presented_key("Token abc") is None and presented_key(None) is None and presented_key("Bearer") is None


def test_image_ids_belong_to_their_tenant() -> None:
    image_id = new_image_id("image/png", "team-a")
    assert owned(image_id, "team-a") and not owned(image_id, "team-b") and not owned(image_id, "")
    assert owned(new_image_id("image/png"), "")  # an open service: one tenant, ""
    assert current() == OPEN
    token = act_as(Principal("team-a", "a1"))
    try:
        assert current().tenant == "team-a"
    finally:
        reset_principal(token)
    assert current() == OPEN
