"""Extraction of the fenced code blocks of README.md and docs/*.md, and the checks the snippet
tests run on them.  The conventions are described in docs/contributing.md and at the top of
tests/docs/test_snippets.py; in short:

* every fenced block names its language: ``python``, ``bash``, ``yaml``, ``json`` or ``text``
  (printed output, tables of figures: not run);
* an HTML comment on the line(s) just before a block gives directives, separated by ``;``:
  ``<!-- snippet: setup=tiny_opt; files=train.py -->``.

  ==================  ======================================================================
  ``setup=NAME``      python: the fixture namespace the block runs in (default ``tiny``;
                      ``none`` for an empty one); see ``NAMESPACES`` in test_snippets.py
  ``continue``        python: run in the namespace the previous python block of the page
                      left (its names, its model as it was trained)
  ``skip=REASON``     any block: not run; the reason (no ``;`` in it) is listed by the suite
  ``launch=N``        python: run in N torchrun processes (snippet_worker.py); the ranks'
                      weights must agree bit for bit and have moved from the start
  ``files=A,B``       bash: names of the user's own files (``train.py``) that need not exist
                      in the repository; a command naming one is checked, not run
  ==================  ======================================================================
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = {"python", "bash", "yaml", "json", "text"}
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"<!--\s*snippet:(?P<body>.*?)-->", re.S)


def doc_pages() -> list[Path]:
    """The Markdown files whose code blocks are tested: README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def parse_directives(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def extract_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, with the directives of the comment just above it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        lang = m.group("info").strip().split(" ")[0].lower() if m.group("info").strip() else ""
        start = i
        body = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip() == fence[0] * len(lines[i].strip())
        ):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        # the directive comment: the nearest non-blank lines above the fence
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        directives: dict[str, str] = {}
        if j >= 0 and lines[j].strip().endswith("-->"):
            k = j
            while k >= 0 and "<!--" not in lines[k]:
                k -= 1
            dm = _DIRECTIVE.search("\n".join(lines[k : j + 1]))
            if dm:
                directives = parse_directives(dm.group("body"))
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", directives))
    return blocks


def all_blocks() -> list[Block]:
    return [b for p in doc_pages() for b in extract_blocks(p)]


def python_groups(blocks: list[Block]) -> list[list[Block]]:
    """Python blocks grouped so that a ``continue`` block runs after the blocks it continues."""
    groups: list[list[Block]] = []
    for b in blocks:
        if b.lang != "python":
            continue
        if "continue" in b.directives and groups and groups[-1][0].page == b.page:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


# ---- bash -------------------------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|"}


def bash_commands(code: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|``, leading ``VAR=value`` assignments removed."""
    text = code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        tokens = list(lex)
        cur: list[str] = []
        for tok in tokens + [";"]:
            if tok in _SEPARATORS:
                while cur and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cur[0]):
                    cur.pop(0)
                if cur:
                    commands.append(cur)
                cur = []
            else:
                cur.append(tok)
    return commands


def flags_of(tokens: list[str]) -> list[str]:
    """The long options a command line names (``--x`` or ``--x=v``), without their values."""
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--") and len(t) > 2]


def script_flags(path: Path) -> set[str]:
    """The long options a script's argparse parser defines, read from its source: every
    ``"--name"`` string literal in it."""
    return set(re.findall(r"""["'](--[A-Za-z0-9][A-Za-z0-9_-]*)["']""", path.read_text()))
