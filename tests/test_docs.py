"""README.md and docs/: every relative link resolves, README stays short enough to read, its quick start and demo
table come first, and the make targets it tells users to run exist."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 300  # issue 20: what this is, how to run it, what it gets; the lab notebook lives in docs/
SCREEN = 50  # lines of one screen: the quick start starts on the first, the demo table is on the second

LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([A-Za-z][\w.-]*)")
RULE = re.compile(r"^([^\s#:=][^:=]*?)\s*::?(?!=)", re.M)  # "demo: data", "a b: c"; not "X := y"


def pages():
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def unfence(text):
    """(text outside fenced code blocks, the blocks' lines)."""
    outside, fenced_lines, fenced = [], [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (fenced_lines if fenced else outside).append(line)
    return "\n".join(outside), "\n".join(fenced_lines)


def split_code(text):
    """(prose, code): fenced blocks and inline code spans go to code, everything else stays prose."""
    outside, fenced = unfence(text)
    code = [fenced] + re.findall(r"`([^`]+)`", outside)
    return re.sub(r"`[^`]+`", "", outside), "\n".join(code)


def slug(heading):
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """The anchors of a markdown file's headings (a '# comment' in a shell block is no heading)."""
    seen, out = {}, set()
    outside, _ = unfence(open(path, encoding="utf-8").read())
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", outside, re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(path):
    """Every relative link or image of a markdown file whose file, or heading (#anchor), does not exist."""
    prose, _ = split_code(open(path, encoding="utf-8").read())
    broken = []
    for _, target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            broken.append(f"{target} (no such file)")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    return broken


def test_readme_is_at_most_300_lines():
    n = len(open(README, encoding="utf-8").read().rstrip("\n").split("\n"))
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move experiment detail to docs/"


def test_quick_start_on_the_first_screen_and_demo_table_on_the_second():
    lines = open(README, encoding="utf-8").read().split("\n")
    quick = next(i for i, l in enumerate(lines) if l.strip() == "## Quick start")
    table = next(i for i, l in enumerate(lines) if l.startswith("| `make demo`"))
    assert quick < SCREEN, f"'## Quick start' is on line {quick + 1}"
    assert table < 2 * SCREEN, f"the demo's results table starts on line {table + 1}"


@pytest.mark.parametrize("path", pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_every_docs_page_is_linked_from_readme():
    prose, _ = split_code(open(README, encoding="utf-8").read())
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for _, t in LINK.findall(prose)}
    assert [p for p in pages()[1:] if p not in linked] == []


def test_make_targets_the_docs_name_exist_in_the_makefile():
    text = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    targets = {t for m in RULE.finditer(text) for t in m.group(1).split()}
    assert {"demo", "test"} <= targets
    for path in pages():
        _, code = split_code(open(path, encoding="utf-8").read())
        named = set(MAKE.findall(code))
        assert named - targets == set(), f"{os.path.relpath(path, ROOT)} names make targets the Makefile lacks"
    assert "demo" in MAKE.findall(split_code(open(README, encoding="utf-8").read())[1])


def test_the_checks_catch_a_broken_link_and_a_missing_heading(tmp_path):
    """The link check itself: a file that is missing and a heading that is not there are both reported; a heading
    with punctuation and code is found under GitHub's anchor."""
    (tmp_path / "b.md").write_text("# Title\n\n## HiPA's `make demo`: results\n\n```sh\n# not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "[ok](b.md) [ok](b.md#hipas-make-demo-results) ![img](b.md) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [bad anchor](b.md#nope) [not a heading](b.md#not-a-heading)\n"
        "`[in code](missing-too.md)`\n")
    assert broken_links(str(tmp_path / "a.md")) == [
        "missing.md (no such file)", "b.md#nope (no such heading)", "b.md#not-a-heading (no such heading)"]
