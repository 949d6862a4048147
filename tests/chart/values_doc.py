"""The chart's values table, generated from the `# --` comments in values.yaml (helm-docs style).

Print it with `python -m tests.chart.values_doc`; a test keeps charts/sdserve/README.md in sync.
"""

from __future__ import annotations

import re

import yaml

from tests.chart.helpers import CHART

KEY = re.compile(r"^(\s*)([\w.-]+):(.*)$")


def documented_values() -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML, description) for every value with a `# --` comment."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    in_comment = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment, in_comment = [stripped[4:].strip()], True
            continue
        if stripped.startswith("#"):
            if in_comment:
                comment.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match or line.lstrip().startswith("-"):
            in_comment = False
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if in_comment:
            path = ".".join(k for _, k in stack)
            node = values
            for _, key in stack:
                node = node[key]
            default = yaml.safe_dump(node, default_flow_style=True, width=10_000).strip()
            default = default.removesuffix("...").strip()
            rows.append((path, default, " ".join(comment)))
        comment, in_comment = [], False
    return rows


def values_table() -> str:
    lines = ["| value | default | description |", "|---|---|---|"]
    for key, default, text in documented_values():
        shown = default if len(default) <= 60 else "see values.yaml"
        lines.append(f"| `{key}` | `{shown}` | {text} |".replace("`` ", '`""` '))
    return "\n".join(lines)


if __name__ == "__main__":
    print(values_table())
