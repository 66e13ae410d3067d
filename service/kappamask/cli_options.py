"""The command-line options that several `kappamask` commands share (the service's
commands in kappamask.cli, the tools' in kappamask.tools.cli): declared once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import click

from kappamask import settings
from kappamask.bands import RESOLUTIONS
from kappamask.options import RunOptions, declarations
from kappamask.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

# Flags of runtime settings default to None: the setting (kappamask.settings: the
# environment, else its one default) applies unless the flag is given.
triton_url_option = click.option(
    "--triton-url",
    default=None,
    help="Triton host:port (KAPPAMASK_TRITON_URL); a local Triton is started when neither "
    "is given.",
)
repository_option = click.option(
    "--model-repository",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model repository of the local Triton (KAPPAMASK_MODEL_REPOSITORY; default: the "
    "project's triton_models/).",
)
protocol_option = click.option(
    "--protocol",
    type=click.Choice(["http", "grpc"]),
    default=None,
    help="Protocol to Triton (KAPPAMASK_TRITON_PROTOCOL; default: http).",
)


def runtime_settings(flags: Mapping[str, Any]) -> Settings:
    """This process's settings with the flags of ``triton_url_option``,
    ``protocol_option`` and ``repository_option`` (and any other flag named after a
    setting) that were given."""
    names = {f.name for f in fields(Settings)}
    aliases = {"protocol": "triton_protocol"}
    given = {aliases.get(k, k): v for k, v in flags.items() if aliases.get(k, k) in names}
    return settings.current().replace(**given)


def run_option_flags() -> list[Callable[[F], F]]:
    """The CLI flags of ``RunOptions``, derived from its declaration (kappamask.options):
    ``--name-with-dashes``, the field's default, choices from the schema's enum, ranges
    from its minimum and maximum, ``--x/--no-x`` for a boolean that defaults to true."""
    defaults = RunOptions()
    flags = []
    for name, declared in declarations():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        schema, extra = declared.schema, declared.flag
        kwargs: dict[str, Any] = {"default": default, "help": declared.help}
        if schema.get("type") == "boolean":
            if default:
                flag = f"{flag}/--no-{flag[2:]}"
                kwargs["show_default"] = True
            else:
                kwargs["is_flag"] = True
        elif "choices" in extra or "enum" in schema:
            choices = extra.get("choices", schema.get("enum"))
            kwargs["type"] = click.Choice([str(c) for c in choices])
            kwargs["default"] = None if default is None else str(default)
            kwargs["show_default"] = default is not None
        elif schema.get("type") == "number":
            kwargs["type"] = click.FloatRange(schema.get("minimum"), schema.get("maximum"))
            kwargs["show_default"] = True
        if extra.get("path"):
            kwargs["type"] = click.Path(exists=True, dir_okay=False, path_type=Path)
        for key in ("type", "nargs", "metavar"):
            if key in extra:
                kwargs[key] = extra[key]
        flags.append(click.option(flag, name, **kwargs))
    return flags


#: ``--out`` of `review` and `review-scenes`.
REVIEW_OUT_HELP = "Folder for the ranked sub-tiles, index.json and index.html."


def out_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--out", "out_dir", type=click.Path(path_type=Path), required=True, help=help_text
    )


def existing_file_option(
    flag: str, dest: str, help_text: str, metavar: str | None = None
) -> Callable[[F], F]:
    """An optional flag naming a file that must exist."""
    return click.option(
        flag,
        dest,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        metavar=metavar,
        help=help_text,
    )


def out_file_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--out",
        "out_path",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        help=help_text,
    )


def resolution_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--resolution",
        type=click.Choice([str(r) for r in RESOLUTIONS]),
        default=default,
        show_default=True,
        help="Output resolution in metres.",
    )


def install_repository_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--repository",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"{help_text} (default: the project's triton_models/).",
    )


def paths_option(
    flag: str, name: str, help_text: str, file_only: bool = True, required: bool = False
) -> Callable[[F], F]:
    return click.option(
        flag,
        name,
        multiple=True,
        required=required,
        type=click.Path(exists=True, dir_okay=not file_only, path_type=Path),
        help=help_text,
    )
