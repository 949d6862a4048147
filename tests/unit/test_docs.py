"""The README's settings table is generated from AppConfig and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_matches_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "reference"]) == 0
    generated = capsys.readouterr().out.strip()
    text = README.read_text()
    start = text.index("<!-- config-reference:start -->") + len("<!-- config-reference:start -->")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end].strip() == generated, "regenerate the table with `sdserve config reference`"


def test_readme_quickstart_is_the_two_commands() -> None:
    text = README.read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
