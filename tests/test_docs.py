"""The documents hold: every link and picture in README.md and docs/*.md resolves inside the
repository (or is a public page on a host named here), every anchor names a heading, every
`gqn-fast ...` command in a code block parses with the real parser, and the README stays short.

The checks are functions of a document's text, so the tests below also feed them a broken link
and a misspelt flag and see them caught.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from gqn_fast.cli import ArgumentsError, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
# Links may leave the repository for no host: a project elsewhere is named, not linked.
PUBLIC_HOSTS = ()

FENCE = re.compile(r"^(```|~~~)(.*)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
COMMAND_LANGUAGES = ("", "bash", "sh", "shell", "console")


def split_blocks(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(prose lines, [(language, lines) of each fenced code block])."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if block is None and fence:
            block = (fence.group(2).strip().lower(), [])
        elif block is not None and fence and not fence.group(2).strip():
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    if block is not None:
        blocks.append(block)
    return prose, blocks


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for line in split_blocks(text)[0]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen[f"{base}-{count}"] = 1
    return set(seen)


def link_problems(document: Path, text: str, root: Path = ROOT) -> list[str]:
    """What is wrong with the links and pictures of `text`, a document at `document`."""
    problems = []
    for line in split_blocks(text)[0]:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            where = f"{document.relative_to(root)}: link {target}"
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                if not target.startswith(PUBLIC_HOSTS):
                    problems.append(f"{where}: leaves the repository")
                continue
            path_part, _, fragment = target.partition("#")
            resolved = (document.parent / path_part).resolve() if path_part else document
            if not resolved.is_relative_to(root):
                problems.append(f"{where}: points outside the repository")
            elif not resolved.exists():
                problems.append(f"{where}: {resolved.relative_to(root)} does not exist")
            elif fragment and resolved.suffix == ".md":
                headings = anchors(resolved.read_text() if path_part else text)
                if fragment not in headings:
                    problems.append(f"{where}: no heading #{fragment} in {resolved.relative_to(root)}")
    return problems


def shown_commands(text: str) -> list[list[str]]:
    """The arguments after `gqn-fast` (or `python -m gqn_fast`, `torchrun ... -m gqn_fast`) of
    every command in a shell code block, comments dropped, `&&`-chains split."""
    commands = []
    for language, lines in split_blocks(text)[1]:
        if language not in COMMAND_LANGUAGES:
            continue
        for line in lines:
            words = shlex.split(line, comments=True)
            segment: list[str] = []
            for word in [*words, "&&"]:
                if word not in ("&&", ";", "||", "|"):
                    segment.append(word)
                    continue
                if segment[:1] == ["gqn-fast"]:
                    commands.append(segment[1:])
                elif "gqn_fast" in segment and segment[segment.index("gqn_fast") - 1] == "-m":
                    commands.append(segment[segment.index("gqn_fast") + 1 :])
                segment = []
    return commands


def options_of(parser: argparse.ArgumentParser, args: list[str]) -> set[str]:
    """The option strings of the (sub)command that `args` names: argparse accepts an abbreviated
    option, and a document should show the whole name."""
    options = set()
    for word in ["", *args]:
        subcommands = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if word and subcommands and word in subcommands[0].choices:
            parser = subcommands[0].choices[word]
        options = {option for action in parser._actions for option in action.option_strings}
    return options


def command_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Each shown command the real parser refuses, with argparse's own message, or that
    abbreviates an option."""
    problems = []
    for args in shown_commands(text):
        command = f"gqn-fast {shlex.join(args)}"
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except ArgumentsError as error:
            problems.append(f"{command}: {error}")
            continue
        except SystemExit:
            message = stderr.getvalue().strip().splitlines()
            problems.append(f"{command}: {message[-1] if message else 'exits'}")
            continue
        known = options_of(parser, args)
        for word in args:
            if word.startswith("--") and word.split("=")[0] not in known:
                problems.append(f"{command}: {word.split('=')[0]} is not an option's whole name")
    return problems


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_pictures_resolve_inside_the_repository(document):
    assert link_problems(document, document.read_text()) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_commands_parse(document, parser):
    assert command_problems(document.read_text(), parser) == []


def test_the_documents_show_commands_to_check(parser):
    shown = [args for document in DOCUMENTS for args in shown_commands(document.read_text())]
    assert {args[0] for args in shown} >= {"train", "eval", "data", "analyze", "export", "sample"}


def python_examples(text: str) -> list[str]:
    return ["\n".join(lines) for language, lines in split_blocks(text)[1] if language == "python"]


@pytest.mark.parametrize(
    "document",
    [document for document in DOCUMENTS if python_examples(document.read_text())],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_python_examples_run(document, tmp_path, monkeypatch):
    """Each Python block runs as shown, in order, in an empty folder (a later block may read the
    files an earlier one wrote); "old_checkpoint.pt" is a state_dict of the ConvLSTM shown."""
    import torch

    from gqn_fast.nn import ConvLSTM

    monkeypatch.chdir(tmp_path)
    text = document.read_text()
    if "old_checkpoint.pt" in text:
        model = ConvLSTM(input_dim=1, hidden_dim=[64, 64], kernel_size=(3, 3), num_layers=2, batch_first=True)
        torch.save(model.state_dict(), "old_checkpoint.pt")
    for number, example in enumerate(python_examples(text)):
        exec(compile(example, f"{document.name}, Python block {number + 1}", "exec"), {"__name__": "__docs__"})


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md: {lines} lines, at most {README_MAX_LINES}"


def test_a_broken_link_an_outside_link_and_a_missing_anchor_are_caught():
    text = "\n".join(
        [
            "# Title",
            "[gone](docs/no-such-page.md) ![gone](docs/images/none.png)",
            "[out](../shared/GQN_SPEC.md) [web](https://example.com/page)",
            "[anchor](docs/spec.md#no-such-heading) [here](#title) [there](docs/spec.md#viewpoints)",
            "`[in code](nowhere.md)`",
            "```",
            "[in a block](nowhere.md)",
            "```",
        ]
    )
    problems = link_problems(ROOT / "README.md", text)
    assert len(problems) == 5, problems
    for expected in ("no-such-page.md", "none.png", "../shared/GQN_SPEC.md", "example.com", "no-such-heading"):
        assert any(expected in problem for problem in problems), (expected, problems)


def test_a_misspelt_flag_and_a_wrong_command_are_caught(parser):
    text = "\n".join(
        [
            "```bash",
            "pip install -e . && gqn-fast train --preset small --step 10   # abbreviated: argparse takes it",
            "gqn-fast data make rooms --scene 20 --out data/x",
            "gqn-fast train --preset small --batchsize 8",
            "python -m gqn_fast evaluate CKPT",
            "gqn-fast train --preset tiny",
            "gqn-fast eval CKPT --scenes 300   # this one parses",
            "```",
            "```python",
            "gqn-fast not a shell block",
            "```",
        ]
    )
    problems = command_problems(text, parser)
    assert len(problems) == 5, problems
    assert "--step is not an option's whole name" in problems[0]
    assert "--scene is not an option's whole name" in problems[1]
    assert "unrecognized argument --batchsize" in problems[2]
    assert "invalid choice: 'evaluate'" in problems[3]
    assert "invalid choice: 'tiny'" in problems[4]


def test_slugs_follow_github():
    assert slug("The step on a GPU: CUDA graphs") == "the-step-on-a-gpu-cuda-graphs"
    assert slug("Converting DeepMind's data") == "converting-deepminds-data"
    assert slug("Use the fast `ConvLSTM` in your own model") == "use-the-fast-convlstm-in-your-own-model"
    assert anchors("# A\n## A\n```\n# B\n```\n") == {"a", "a-1"}
