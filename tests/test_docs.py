"""Docs that cannot rot: every command README.md and docs/ show is one the current CLIs accept, every
relative link and image resolves, and every CLI flag explains itself in --help.

A command is checked against its module's argparse parser (each CLI module has `build_parser()`),
without running it: unknown flags, invalid choices, values of the wrong type and missing required
arguments fail. Commands are read from the fenced shell blocks (```bash, ```sh, ```shell):
`python -m MODULE ...`, `python SCRIPT.py ...` and `torchrun ... -m MODULE ...`, after environment
assignments (`OMP_NUM_THREADS=1 python ...`), line continuations and comments.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Every command-line tool of the package, by the module whose build_parser() defines it.
CLIS = ["train.__main__", "train.prepare", "train.evaluate", "train.consolidate", "gpt.sample", "gpt.export",
        "gpt.serve.__main__", "bench.run", "bench.gpu_check", "bench.muon_ns", "kernels.report"]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the fenced shell blocks of a Markdown text, each as its words."""
    out = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for w in [*words, "&&"]:
                if w in ("&&", "||", ";", "|"):
                    if command:
                        out.append(command)
                    command = []
                else:
                    command.append(w)
    return out


def cli_of(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) for a python/torchrun command of this package, else None."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # FOO=1 python ...
        words = words[1:]
    if not words:
        return None
    if words[0] == "torchrun":
        if "-m" not in words:
            return None
        i = words.index("-m")
        return _module_main(words[i + 1]), words[i + 2:]
    if words[0] not in ("python", "python3"):
        return None
    if len(words) > 2 and words[1] == "-m":
        return _module_main(words[2]), words[3:]
    if len(words) > 1 and words[1].endswith(".py") and (ROOT / words[1]).exists():
        return ".".join(Path(words[1]).with_suffix("").parts), words[2:]
    return None


def _module_main(name: str) -> str:
    return f"{name}.__main__" if (ROOT / name.replace(".", "/") / "__main__.py").exists() else name


def all_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for words in shell_commands(doc.read_text()):
            cli = cli_of(words)
            if cli is not None and cli[0].split(".")[0] in ("train", "gpt", "bench", "kernels"):
                found.append((f"{doc.relative_to(ROOT)}: {shlex.join(words)}", *cli))
    return found


def parse_error(module: str, args: list[str]) -> str | None:
    """argparse's complaint about `args`, or None if the module's parser accepts them."""
    parser = importlib.import_module(module).build_parser()
    from gpt.cli import kebab_flags
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(kebab_flags(args))
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


COMMANDS = all_commands()


def test_the_docs_show_commands_of_every_main_tool():
    modules = {m for _, m, _ in COMMANDS}
    assert {"train.__main__", "train.evaluate", "gpt.sample", "gpt.export", "bench.run"} <= modules, modules


@pytest.mark.parametrize("where, module, args", COMMANDS, ids=[c[0][:120] for c in COMMANDS])
def test_every_documented_command_is_accepted_by_its_cli(where, module, args):
    assert parse_error(module, args) is None, f"{where}\n  -> {parse_error(module, args)}"


def test_a_wrong_flag_or_choice_in_a_doc_fails():
    """The check itself can fail: a renamed flag, a bad choice, a bad type."""
    doc = "```bash\npython -m train --max-iterations 5\npython -m gpt.sample --kernels cuda\n" \
          "OMP_NUM_THREADS=1 python -m train --batch-size many \\\n  --preset tiny\n```\n"
    found = [cli_of(w) for w in shell_commands(doc)]
    assert [m for m, _ in found] == ["train.__main__", "gpt.sample", "train.__main__"]
    assert all(parse_error(m, a) for m, a in found), [parse_error(m, a) for m, a in found]


def links() -> list[tuple[Path, str]]:
    out = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # not inside code blocks
        out += [(doc, target) for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]
    return out


@pytest.mark.parametrize("doc, target", links(), ids=[f"{d.relative_to(ROOT)}->{t}" for d, t in links()])
def test_every_relative_link_and_image_resolves(doc, target):
    path, _, anchor = target.partition("#")
    resolved = (doc.parent / path).resolve() if path else doc
    assert resolved.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in headings(resolved), f"{doc.relative_to(ROOT)} links to {target}: no such heading"


def headings(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_explains_itself(module):
    parser = importlib.import_module(module).build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{module}: {name}"
