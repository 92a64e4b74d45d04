"""MkDocs hooks (mkdocs.yml `hooks:`): the reference pages are generated from the code, never
copied by hand.

- `<!-- cli-reference -->` becomes every `caproj` command's `--help`, from the CLI's own
  argparse parsers (`caproj.cli.build_parser`).
- `<!-- api-reference -->` becomes one mkdocstrings entry per name in `caproj.__all__`.
"""

from __future__ import annotations

import os

CLI_MARK = "<!-- cli-reference -->"
API_MARK = "<!-- api-reference -->"


def cli_reference() -> str:
    """Markdown: the top-level help, then one section per subcommand with its full help."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: a fixed width here
    from caproj.cli import build_parser

    ap = build_parser()
    parts = ["```text", ap.format_help().rstrip(), "```", ""]
    for name, parser in ap.commands.items():
        parts += [f"## caproj {name}", "", "```text", parser.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def api_reference() -> str:
    """Markdown: `::: caproj.NAME` for every exported name, in `__all__`'s order."""
    import caproj

    return "\n\n".join(f"::: caproj.{name}" for name in caproj.__all__) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs API)
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_reference())
    if API_MARK in markdown:
        markdown = markdown.replace(API_MARK, api_reference())
    return markdown
