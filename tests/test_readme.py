"""README is a user's guide: short, nothing twice, and every command and file it shows exists."""

import re
from pathlib import Path

from npp.app.cli import resolve

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_is_short_and_says_nothing_twice():
    assert README.count("\n") <= 250
    long_lines = [ln.strip() for ln in README.splitlines() if len(ln.strip()) >= 60 and not ln.startswith("|---")]
    assert len(long_lines) == len(set(long_lines)), [ln for ln in long_lines if long_lines.count(ln) > 1]


def test_every_make_target_it_shows_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    shown = {a or b for a, b in re.findall(r"`make ([a-z][a-z-]*)|^make ([a-z][a-z-]*)", README, re.M)}
    assert shown and shown <= targets, shown - targets


def test_every_npp_command_it_shows_exists():
    shown = set()
    for words in re.findall(r"`npp ([a-z][a-z -]*?)(?: --|`| [A-Z]|\.\.\.)", README):
        shown.add(tuple(words.split()))
    assert shown
    for words in shown:
        got, _, _ = resolve(list(words))  # an unknown command raises, naming the closest
        assert got == list(words), (words, got)


def test_every_file_it_links_exists():
    for path in re.findall(r"\]\(((?:docs|tests|bench|slurm|ds_configs)/[^)#]+)\)", README):
        assert (REPO / path).exists(), path
    for path in re.findall(r"`((?:docs|tests|bench|slurm|ds_configs)/[\w./-]+)`", README):
        assert (REPO / path).exists(), path
