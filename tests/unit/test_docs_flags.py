"""Docs that cannot drift: every `--flag` the README, docs/node.md and docs/operations.md write
exists in a real argparse parser; the defaults their tables give are the parsers' (and
NodeSettings') defaults; and every coordinator and node flag is documented somewhere."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from coordinator.__main__ import build_parser as coordinator_parser
from coordinator.retention import parse_duration
from node import benchmark, config, status_report
from node.__main__ import build_parser as node_parser
from node.settings import NodeSettings
from sparecycles.cli import broker, demo
from sparecycles.cli.main import build_parser as cli_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = {name: ROOT / name for name in ("README.md", "docs/node.md", "docs/operations.md")}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Lines about other programs' flags (`useradd --system`, `systemctl --user`, `pip install --user`).
FOREIGN = ("useradd", "systemctl", "pip install", "docker ", "journalctl")
# Node settings whose default is decided on the machine it runs on; the table describes it in words.
MACHINE_DEFAULTS = {"owner", "slots", "prefetch", "key", "cache_dir", "owner_key", "cert"}


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= flags_of(sub)
    return found


def all_flags() -> set[str]:
    parsers = [coordinator_parser(), node_parser(), status_report.build_parser(), benchmark.build_parser(),
               broker.build_parser(), demo.build_parser(), cli_parser()]
    flags = set().union(*(flags_of(p) for p in parsers))
    # The benchmarks build their parsers inside main(); their flags are read from their source.
    for script in (ROOT / "benchmarks").glob("*.py"):
        flags.update(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", script.read_text()))
    return flags


def table_rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def literal(cell: str) -> str | None:
    """The default a cell states as one literal (`60.0`, `` `INFO` ``, `true`), None for words."""
    m = re.fullmatch(r"`?([\w.:/@<>*-]+)`?", cell)
    return m.group(1) if m else None


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_flag_the_docs_write_exists_in_a_real_parser(doc: str) -> None:
    known = all_flags()
    unknown = []
    for number, line in enumerate(DOCS[doc].read_text().splitlines(), 1):
        if any(tool in line for tool in FOREIGN):
            continue
        unknown += [f"{doc}:{number}: {flag}" for flag in FLAG.findall(line) if flag not in known]
    assert not unknown, "flags in the docs that no parser has:\n" + "\n".join(unknown)


def coordinator_table() -> dict[str, str]:
    return {m.group(1): row[1] for row in table_rows(DOCS["docs/operations.md"])
            if len(row) >= 3 and (m := re.fullmatch(r"`(--[a-z][a-z0-9-]*)`", row[0]))}


def test_every_coordinator_flag_is_in_the_operations_table_and_nothing_else_is() -> None:
    documented = coordinator_table()
    actual = flags_of(coordinator_parser()) - {"--help"}
    assert set(documented) == actual, (sorted(actual - set(documented)), sorted(set(documented) - actual))


def test_the_operations_tables_defaults_are_the_coordinators() -> None:
    parser = coordinator_parser()
    defaults = {a.option_strings[-1]: a.default for a in parser._actions if a.option_strings}
    checked = 0
    for flag, cell in coordinator_table().items():
        default, stated = defaults[flag], literal(cell)
        if default in (None, [], False) or flag == "--version":
            # computed, repeatable or a switch: described in words, never a literal that could be wrong
            assert stated in (None, "off", "none"), f"{flag}: the docs say {cell!r}, the parser has {default!r}"
            continue
        assert stated is not None, f"{flag}: the docs give no literal default ({cell!r}); the parser's is {default!r}"
        if flag == "--retention":
            assert parse_duration(stated) == default, flag
        elif isinstance(default, float | int):
            assert float(stated) == float(default), f"{flag}: docs {stated}, parser {default}"
        else:
            assert stated == str(default), f"{flag}: docs {stated}, parser {default}"
        checked += 1
    assert checked >= 25


def node_table() -> dict[str, str]:
    return {m.group(1): row[2] for row in table_rows(DOCS["docs/node.md"])
            if len(row) == 4 and (m := re.fullmatch(r"`([a-z_]+)`", row[0]))}


def test_the_node_tables_keys_are_its_flags_and_their_defaults_are_node_settings() -> None:
    table = node_table()
    flags = flags_of(node_parser())
    settings = NodeSettings()
    options = {o.key: o for o in config.OPTIONS}
    assert set(table) == set(options), (sorted(set(options) - set(table)), sorted(set(table) - set(options)))
    for key, cell in table.items():
        option = options[key]
        assert f"--{key.replace('_', '-')}" in flags, key
        if key in MACHINE_DEFAULTS:
            continue
        default = "INFO" if option.field is None else getattr(settings, option.field)
        if isinstance(default, int) and not isinstance(default, bool) and option.scale > 1:
            default //= option.scale
        stated = literal(cell)
        assert stated is not None, f"{key}: no literal default in docs/node.md ({cell!r})"
        if isinstance(default, bool):
            assert stated == str(default).lower(), key
        elif isinstance(default, int | float):
            assert float(stated) == float(default), f"{key}: docs {stated}, NodeSettings {default}"
        else:
            assert stated == str(default), f"{key}: docs {stated}, NodeSettings {default}"


def test_every_node_flag_is_documented() -> None:
    text = "\n".join(p.read_text() for p in DOCS.values())
    keys = set(node_table())
    missing = [flag for flag in sorted(flags_of(node_parser()) - {"--help"})
               if flag not in text and flag[2:].replace("-", "_") not in keys]
    assert not missing, f"node flags not in README, docs/node.md or docs/operations.md: {missing}"
