"""Griffe extension: render the reST bits of hesse's Google-style docstrings as Markdown.

The docstrings follow DESIGN.md (Google style with ``.. math::`` blocks and Sphinx roles).
mkdocstrings renders Markdown, so before parsing we rewrite, per docstring:

* ``.. math::`` blocks (inline or indented) -> ``$$ ... $$`` (pymdownx.arithmatex),
* simple tables (``=====  =====`` borders) -> Markdown tables,
* ``:math:`x``` -> ``$x$``,
* ``:class:`~a.b.C``` and the other Sphinx roles -> ```C``` (code; no cross-reference,
  so a name that is not documented cannot fail a strict build),
* a paragraph ending in ``::`` (a reST literal block follows) -> ending in ``:``,
* an ``Example:`` section -> ``Examples:`` (griffe renders ``>>>`` lines as code only there).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|ref|doc):`(~?)([^`]+)`"
)
_MATH_ROLE = re.compile(r":math:`([^`]+)`")


def _role(m: re.Match) -> str:
    tilde, target = m.groups()
    target = target.strip()
    if "<" in target and target.endswith(">"):  # :ref:`text <target>`
        target = target.split("<")[0].strip()
    elif tilde:
        target = target.split(".")[-1]
    return f"`{target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _table(lines: list[str], i: int, out: list[str]) -> int:
    """Convert the reST simple table starting at ``lines[i]`` (a ``=== ===`` border) to a
    Markdown table appended to ``out``; return the index after it (or ``i`` if not one)."""
    border = lines[i]
    pad = border[: _indent(border)]
    cols = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
    end = next((j for j in range(i + 1, len(lines)) if lines[j] == border), None)
    if end is None:
        return i
    rows: list[list[str]] = []
    for line in lines[i + 1 : end]:
        if not line.strip():
            continue
        cells = []
        for c, (a, _) in enumerate(cols):
            b = cols[c + 1][0] if c + 1 < len(cols) else len(line)
            cells.append(line[a:b].strip())
        if rows and not cells[0]:  # continuation line
            rows[-1] = [f"{x} {y}".strip() for x, y in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    if out and out[-1].strip():
        out.append("")
    out.append(pad + "| " + " | ".join(" " for _ in cols) + " |")
    out.append(pad + "|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [_ROLE.sub(_role, _MATH_ROLE.sub(r"$\1$", c)) for c in r]
        out.append(pad + "| " + " | ".join(cells) + " |")
    out.append("")
    return end + 1


def rst_to_markdown(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(".. math::"):
            pad = line[: _indent(line)]
            body: list[str] = []
            inline = stripped[len(".. math::") :].strip()
            if inline:
                body.append(inline)
            i += 1
            base = _indent(line)
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            while body and not body[0]:
                body.pop(0)
            # one equation per blank-line-separated chunk, as Sphinx does
            eqs, cur = [], []
            for b in body:
                if b:
                    cur.append(b)
                elif cur:
                    eqs.append(cur)
                    cur = []
            if cur:
                eqs.append(cur)
            if out and out[-1].strip():
                out.append("")
            for eq in eqs:
                out.extend([pad + "$$", *(pad + e for e in eq), pad + "$$", ""])
            continue
        if _BORDER.match(line):
            j = _table(lines, i, out)
            if j != i:
                i = j
                continue
        if stripped == "Example:":
            line = line.replace("Example:", "Examples:")
        line = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", line)
        line = _ROLE.sub(_role, line)
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            head = line.rstrip()[:-2].rstrip()
            line = head + ":" if head else ""
        out.append(line)
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring once, when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
