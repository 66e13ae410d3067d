"""The command-line options that several `kappamask` commands share (the service's
commands in kappamask.cli, the tools' in kappamask.tools.cli): declared once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kappamask.bands import MAX_BUFFER_M, RESOLUTIONS

F = TypeVar("F", bound=Callable[..., Any])

triton_url_option = click.option(
    "--triton-url", default=None, help="Triton host:port; a local Triton is started when omitted."
)
repository_option = click.option(
    "--model-repository",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="KAPPAMASK_MODEL_REPOSITORY",
    help="Model repository of the local Triton (default: the project's triton_models/).",
)
protocol_option = click.option(
    "--protocol",
    type=click.Choice(["http", "grpc"]),
    default="http",
    show_default=True,
    help="Protocol to Triton.",
)


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


def buffer_option(flag: str, what: str) -> Callable[[F], F]:
    return click.option(
        flag,
        type=click.FloatRange(0, MAX_BUFFER_M),
        default=0.0,
        show_default=True,
        help=f"Grow {what} by this many metres.",
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
