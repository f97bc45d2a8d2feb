"""Every project path the docs name exists: README.md and docs/*.md, checked so a move or rename that forgets a
doc fails here.

Checked: any path that starts with one of the repository's folders (`model/attention.py`, `trainer/cluster/`,
`conf/model/tiny.yaml`, in backquotes, parentheses, code blocks or prose), relative markdown links
(`[x](pipeline.md)`, resolved from the doc's folder) and `python -m pkg.module` commands. Skipped: placeholders
(`<run_dir>/...`, `bench/results/NAME.json`, globs) and what a run creates (`runs/`, `data/`, `multirun/`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "parallel", "trainer", "data_prep", "tests", "bench", "scripts", "docs", "conf")
# a folder name not preceded by a path character (so `runs/x/model/...` or `<dir>/conf/` are not taken), then
# path characters; `:` ends it (`trainer/config.py:JobConfig`)
ANY_FOLDER = "(?:" + "|".join(FOLDERS) + ")"
PATH = re.compile(r"(?<![\w./<>{}$*~-])(" + ANY_FOLDER + r"/[\w./-]*)")
LINK = re.compile(r"\]\(([^()\s]+)\)")
MODULE = re.compile(r"python3? -m (" + ANY_FOLDER + r"(?:\.\w+)*)")


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _placeholder(path: str) -> bool:
    # bench/results/NAME.json, runs/<name>, conf/model/*.yaml: an all-capitals name or a template character
    return any(c in path for c in "*{}<>") or any(re.fullmatch(r"[A-Z_]+", p.split(".")[0]) for p in path.split("/"))


def stale_paths(text: str, root: Path = ROOT) -> list[str]:
    """'line N: path' for every repository path in `text` that does not exist under `root`."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for path in PATH.findall(line):
            path = path.rstrip(".-")  # the end of a sentence or a dash
            if not _placeholder(path) and not (root / path).exists():
                out.append(f"line {n}: {path}")
    return out


def broken_links(text: str, folder: Path) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            target = target.split("#")[0]
            if target and "://" not in target and not target.startswith("mailto:") and not (folder / target).exists():
                out.append(f"line {n}: {target}")
    return out


def missing_modules(text: str, root: Path = ROOT) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for module in MODULE.findall(line):
            base = root.joinpath(*module.split("."))
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                out.append(f"line {n}: python -m {module}")
    return out


@pytest.mark.parametrize("doc", docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc: Path):
    text = doc.read_text()
    problems = stale_paths(text) + broken_links(text, doc.parent) + missing_modules(text)
    assert not problems, f"{doc.relative_to(ROOT)} names what does not exist:\n" + "\n".join(problems)


def test_the_checks_find_stale_references():
    text = "\n".join([
        "The schedule (`parallel/schedule.py`) and the engine (trainer/engine.py).",  # both moved
        "```", "python -m trainer.slurm_old hosts", "from model/fp8.py import x", "```",  # a module, a file
        "See [the plan](nowhere.md) and [pipeline](pipeline.md#the-engine).",  # one broken link, one good
        "Fine: `trainer/cluster/`, (model/attention.py), `trainer/config.py:JobConfig`, trainer/report/metrics.py.",
        "Placeholders: `bench/results/NAME.json`, `conf/model/*.yaml`, `<run_dir>/checkpoints`, runs/x/model/y.py.",
        "python -m trainer.train and python -m model.info and python -m bench",
    ])  # fmt: skip
    assert stale_paths(text) == ["line 1: parallel/schedule.py", "line 1: trainer/engine.py", "line 4: model/fp8.py"]
    assert broken_links(text, ROOT / "docs") == ["line 6: nowhere.md"]
    assert missing_modules(text) == ["line 3: python -m trainer.slurm_old"]
