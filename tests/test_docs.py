"""The README is a front door and the docs hold together: every relative link in README.md
and docs/*.md names a file or folder of the project, every `#anchor` a heading of its file
(GitHub's slugs), and the README stays short."""

import re
from pathlib import Path
from urllib.parse import unquote

from tests.factory import ROOT

README_MAX_LINES = 200
SKIPPED_SCHEMES = ("http://", "https://", "mailto:")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) and ![alt](target), the target bare or in <...>, with an optional "title"
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
GITHUB_LINE_ANCHOR = re.compile(r"L\d+(-L\d+)?")


def _outside_fences(text: str) -> str:
    """The text with its fenced code blocks blanked, line for line."""
    lines, fence = text.split("\n"), None
    for i, line in enumerate(lines):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence, lines[i] = opened.group(1)[0], ""
        elif fence is not None:
            if opened and opened.group(1)[0] == fence:
                fence = None
            lines[i] = ""
    return "\n".join(lines)


def _prose(text: str) -> str:
    """The text outside code (fences blanked, code spans turned into x's): what GitHub
    renders as links, at the same offsets and lines."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", "x", m.group(0)), _outside_fences(text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation other than '-'
    and '_' dropped (backticks too), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    for line in _outside_fences(path.read_text()).split("\n"):
        if heading := HEADING.match(line):
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen.setdefault(f"{slug}-{count}", 1)
    return set(seen)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition in a Markdown
    file, outside code."""
    prose = _prose(path.read_text())
    found = [m for pattern in (INLINE_LINK, REFERENCE) for m in pattern.finditer(prose)]
    return sorted(
        (prose.count("\n", 0, m.start(1)) + 1, m.group(1).removeprefix("<").removesuffix(">"))
        for m in found
    )


def broken(path: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a link from `path` to `target` does not resolve, or None when it does."""
    if target.startswith(SKIPPED_SCHEMES):
        return None
    where, _, anchor = target.partition("#")
    dest = (path.parent / unquote(where)).resolve() if where else path.resolve()
    if not where and not anchor:
        return "empty target"
    if not dest.is_relative_to(root.resolve()):
        return "outside the repository"
    if not dest.exists():
        return "no such file or folder"
    if not anchor:
        return None
    if dest.suffix.lower() != ".md":
        if dest.is_file() and GITHUB_LINE_ANCHOR.fullmatch(anchor):
            return None
        return f"#{anchor} on a file that is not Markdown"
    if anchor not in anchors(dest):
        return f"no heading with the anchor #{anchor} in {dest.relative_to(root.resolve())}"
    return None


def _docs(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    assert len(_docs()) > 1, "docs/ holds no Markdown page"
    failures = [
        f"{path.relative_to(ROOT)}:{line}: {target} ({why})"
        for path in _docs()
        for line, target in links(path)
        if (why := broken(path, target))
    ]
    assert not failures, "broken links:\n" + "\n".join(failures)


def test_the_readme_stays_a_front_door():
    readme = ROOT / "README.md"
    lines = len(readme.read_text().splitlines())
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines (under {README_MAX_LINES} wanted): move reference "
        "sections to docs/"
    )
    linked = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme)}
    unlinked = [p.name for p in _docs()[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {', '.join(unlinked)}"


def test_links_and_anchors_are_read_as_github_renders_them(tmp_path):
    """Code is not a link, a heading in a code block is not an anchor, slugs follow
    GitHub's rules, and each broken link is named with its line."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Data: the `shard` stage\n\n## The default budget's sweep, measured\n\n"
        "## Again\n\n## Again\n\n"
        "```bash\n# not a heading\n[not](a-link.md)\n```\n\n"
        "`[not](a-link.md)` [results](../results/) ![plot](../results/none.png)\n"
        "[a](#data-the-shard-stage) [b](page.md#the-default-budgets-sweep-measured) "
        "[c](#again-1) [d](#not-a-heading) [e](<../results>) [f](https://example.com/x.md)\n"
        '[g](../../outside.md "title")\n\n[ref]: ../results/gone.md\n'
    )
    assert anchors(page) == {
        "data-the-shard-stage",
        "the-default-budgets-sweep-measured",
        "again",
        "again-1",
    }
    assert {
        (line, target): broken(page, target, root=tmp_path) for line, target in links(page)
    } == {
        (14, "../results/"): None,
        (14, "../results/none.png"): "no such file or folder",
        (15, "#data-the-shard-stage"): None,
        (15, "page.md#the-default-budgets-sweep-measured"): None,
        (15, "#again-1"): None,
        (15, "#not-a-heading"): "no heading with the anchor #not-a-heading in docs/page.md",
        (15, "../results"): None,
        (15, "https://example.com/x.md"): None,
        (16, "../../outside.md"): "outside the repository",
        (18, "../results/gone.md"): "no such file or folder",
    }
