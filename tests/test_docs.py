"""The reference in docs/ against the code: every node's inputs and outputs in docs/nodes.md are the node
classes' (names, order, types, defaults), every training option is in docs/options.md, and every link
between the documents (and from code comments into docs/) points at a file and heading that exist."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

import comfyui_lora_trainer as pack
from comfyui_lora_trainer.nodes.registry import NODES
from comfyui_lora_trainer.training.config import TrainConfig

ROOT = Path(pack.__file__).resolve().parent
DOCS = ROOT / "docs"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a cell may hold an escaped pipe: `attn2\|ff`


def _sections(text: str) -> dict[str, str]:
    """`## Name (`id`)` → the section's text."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _table(section: str, header: str) -> list[list[str]]:
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("\\|", "|") for cell in _CELL_SPLIT.split(line.strip())[1:-1]])
    return rows


def _type(spec: object) -> str:
    return "combo" if isinstance(spec, (list, tuple)) else str(spec)


def _default(options: dict) -> str:
    if "default" not in options:
        return "—"
    value = options["default"]
    return ('""' if value == "" else value) if isinstance(value, str) else str(value)


@pytest.mark.parametrize("node_id", list(NODES))
def test_the_nodes_reference_is_the_schema(node_id):
    cls, name = NODES[node_id]
    sections = _sections((DOCS / "nodes.md").read_text("utf-8"))
    section = sections[f"{name} (`{node_id}`)"]
    spec = cls.INPUT_TYPES()
    inputs = [(n, _type(s[0]), _default(s[1] if len(s) > 1 else {}))
              for kind in ("required", "optional") for n, s in spec.get(kind, {}).items()]
    documented = [(row[0], row[1], row[2].strip("`")) for row in _table(section, "| input | type | default | what it does |")]
    assert documented == inputs
    if cls.RETURN_TYPES:
        outputs = _table(section, "| output | type | what it does |")
        assert [(row[0], row[1]) for row in outputs] == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))
    else:
        assert "No outputs." in section


def test_every_training_option_is_documented():
    documented = {row[0] for row in _table((DOCS / "options.md").read_text("utf-8"),
                                           "| field | node | default | meaning |")}
    assert documented == {f.name for f in fields(TrainConfig)}


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text("utf-8"), flags=re.M)}


def _check_link(source: Path, target: str) -> str | None:
    """None if `target` (relative to `source`, maybe with #anchor) exists; else what is wrong."""
    path, _, anchor = target.partition("#")
    file = (source.parent / path).resolve() if path else source
    if not file.exists():
        return f"{source.relative_to(ROOT)}: {target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in _anchors(file):
        return f"{source.relative_to(ROOT)}: {target}: no such heading"
    return None


def test_links_between_the_documents_resolve():
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
    problems = [problem for page in pages
                for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text("utf-8"))
                if not target.startswith(("http://", "https://", "mailto:"))
                and (problem := _check_link(page, target)) is not None]
    assert not problems, problems


def test_links_from_the_code_into_docs_resolve():
    """Code comments cite `docs/<page>.md#<heading>`; each must exist."""
    cited = []
    for source in ROOT.rglob("*.py"):
        if ".venv" in source.parts or "output" in source.parts:
            continue
        for target in re.findall(r"docs/([\w\-]+\.md(?:#[\w\-]+)?)", source.read_text("utf-8")):
            cited.append((source, target))
    assert cited  # the code does cite the reference
    problems = [p for source, target in cited if (p := _check_link(DOCS / "README.md", target)) is not None]
    assert not problems, problems


def test_no_citation_of_documents_outside_the_repository():
    """The contract the code cites lives in docs/: no citation of the user's spec file or of issue numbers,
    which a clone cannot read, in code or tests (the pattern is built in pieces so this file passes)."""
    pattern = re.compile(r"\bSP" + r"EC(\.md|'s)|(?i:\biss" + r"ue) \d+")  # any letter case for the number citations
    found = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py") if ".venv" not in p.parts
             for i, line in enumerate(p.read_text("utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, found
