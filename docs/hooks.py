"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

A page that holds the line `<!-- generated: cli -->` gets the command-line reference, rendered
from `lightning_fl.cli.build_parser()`; one that holds `<!-- generated: config -->` gets every
config key of the schema (`lightning_fl.config.RunConfig` and the dataclasses inside it) with its
type, default, accepted values (its `Rule`) and the comment written beside it in the source.
Everything is read by introspection, so keys and options that are added or removed show up
without touching this file. The committed plots of the sweeps and the demo
(`experiments/results/<name>/*.png`, outside docs_dir) are added to the site as
`results/<name>/<file>.png`, so that pages can show them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKERS = {"<!-- generated: cli -->": "cli", "<!-- generated: config -->": "config"}
RESULT_PLOTS = "experiments/results/*/*.png"  # relative to ROOT; served as results/<name>/<file>.png


def on_files(files, config):  # MkDocs calls it with these two
    """The committed result plots as site files (docs/ cannot link outside itself under --strict)."""
    from mkdocs.structure.files import File

    src_dir = ROOT / "experiments"  # so a file's page path (what links name) is results/<name>/<file>.png
    for path in sorted(src_dir.glob(RESULT_PLOTS.removeprefix("experiments/"))):
        uri = path.relative_to(src_dir).as_posix()
        files.append(File(uri, str(src_dir), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:  # MkDocs calls it with these four
    for marker, kind in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, cli_reference() if kind == "cli" else config_reference())
    return markdown


def _import(module: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return __import__(module, fromlist=["_"])


def _relative(text: str) -> str:
    """Paths inside the checkout are shown relative to it (defaults such as `--config`'s)."""
    return str(text).replace(f"{ROOT}{os.sep}", "").replace(str(ROOT), ".")


def _cell(text: object) -> str:
    return _relative(str(text)).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


# ------------------------------------------------------------------------------------ the CLI
def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal width
    parser = _import("lightning_fl.cli").build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in commands._choices_actions}
    out = [f"`{parser.prog}` has {len(commands.choices)} commands; `python -m lightning_fl` is the same program.", ""]
    for name, sub in commands.choices.items():
        out += [
            f"## `{parser.prog} {name}`",
            "",
            _sentence(helps.get(name) or ""),
            "",
            "```text",
            _relative(sub.format_usage().strip()),
            "```",
            "",
            "| argument | value | default | what it does |",
            "| --- | --- | --- | --- |",
        ]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
            if action.nargs == 0:
                value = "flag"
            elif not action.option_strings:
                value = "positional" + (", any number" if action.nargs in ("*", "+") else "")
            else:
                value = action.metavar or (action.dest.upper() if action.option_strings else "")
                value = f"`{value}`" + (" ..." if action.nargs in ("*", "+") else "")
                if action.choices:
                    value = "one of " + ", ".join(f"`{c}`" for c in action.choices)
            if action.required and (action.option_strings or action.nargs not in ("*", "?")):
                default = "required"
            elif action.nargs == 0 or action.default in (None, []):
                default = ""
            else:
                default = f"`{_cell(action.default)}`"
            out.append(f"| {flags} | {value} | {default} | {_cell(action.help or '')} |")
        out.append("")
    return "\n".join(out)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") or not text else ".")


# ------------------------------------------------------------------------------ the config schema
def config_reference() -> str:
    schema = _import("lightning_fl.config")
    out = [
        "Every number must also be finite. Lists of sections are indexed from 0 (`data.sites.0.classes`);",
        "the scanners' mapping is keyed by site name (`data.synthetic.scanners.liver.noise_hu`).",
        "",
    ]
    _section(schema.RunConfig, "", "Top-level keys", out)
    return "\n".join(out)


def _section(cls: type, prefix: str, title: str, out: list[str]) -> None:
    """One table for the leaves of `cls`, then a section for each dataclass inside it."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):  # the docstring dataclasses invent
        doc = ""
    heading = f"`{prefix.rstrip('.')}`" if prefix else title
    out += [f"{'##' if prefix.count('.') <= 1 else '###'} {heading}", ""]
    if doc:
        out += [" ".join(doc.split()), ""]
    nested = []
    rows = []
    for spec in dataclasses.fields(cls):
        kind, inner, key = hints[spec.name], _dataclass_in(hints[spec.name]), f"{prefix}{spec.name}"
        if inner is not None:
            child = {list: f"{key}.N.", dict: f"{key}.NAME."}.get(typing.get_origin(kind), f"{key}.")
            nested.append((inner, child, comments.get(spec.name, ""), kind))
            link = f"[`{key}`](#{_anchor(child)})"
            rows.append(f"| {link} | {_type(kind)} | {_default(spec)} | | {_cell(comments.get(spec.name, ''))} |")
            continue
        rule = spec.metadata.get("rule")
        rows.append(
            f"| `{key}` | {_type(kind)} | {_default(spec)} | {_rule(rule)} | {_cell(comments.get(spec.name, ''))} |"
        )
    out += ["| key | type | default | accepted values | what it is |", "| --- | --- | --- | --- | --- |", *rows, ""]
    for inner, child, _, _ in nested:
        _section(inner, child, inner.__name__, out)


def _anchor(prefix: str) -> str:
    """The id the toc extension gives the heading `` `prefix` ``."""
    from markdown.extensions.toc import slugify

    return slugify(prefix.rstrip("."), "-")


def _dataclass_in(kind: object) -> type | None:
    """The schema dataclass a field holds: itself, Optional of it, a list or a mapping of it."""
    if dataclasses.is_dataclass(kind):
        return kind  # type: ignore[return-value]
    for arg in typing.get_args(kind):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type(kind: object) -> str:
    text = re.sub(r"\b(typing|lightning_fl\.config)\.", "", str(kind) if not isinstance(kind, type) else kind.__name__)
    text = re.sub(r"Optional\[(.*)\]", r"\1 or null", text)
    return f"`{text}`".replace("|", "or")


def _default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value == "???":
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value in ([], {}):
        return f"`{value}`"
    return f"`{_cell(value)}`"


SIGNS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _rule(rule: object) -> str:
    """A `Rule` in words, from whichever of its fields are set (unknown ones shown as name=value)."""
    if rule is None:
        return ""
    parts = []
    for spec in dataclasses.fields(rule):
        value = getattr(rule, spec.name)
        if value == spec.default:
            continue
        if spec.name == "choices":
            parts.append("one of " + ", ".join(f"`{c}`" for c in value))
        elif spec.name in SIGNS:
            parts.append(f"{SIGNS[spec.name]} {int(value) if float(value).is_integer() else value}")
        elif spec.name == "length":
            parts.append(f"{value} values")
        elif spec.name == "ordered":
            parts.append("[low, high] with low ≤ high")
        else:
            parts.append(f"{spec.name}={value!r}")
    return "; ".join(parts)


def _field_comments(cls: type) -> dict[str, str]:
    """The comment on a field's line and the comment lines just above it, from the source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if match and not stripped.startswith(("def ", '"""')):
            text = " ".join(above + ([match.group(2)] if match.group(2) else []))
            if text:
                found[match.group(1)] = text
        above = []
    return found
