"""The ``graphopt`` command line: thin over the library.

One handler owns exit codes: 0 success, 2 user errors (bad input, options, files), 1 a failed
verification or an internal error. User errors are one line on stderr, never a traceback
(``--debug`` or ``GRAPHOPT_DEBUG=1`` shows it).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback

import click

from graphopt.errors import GraphoptError

__all__ = ["cli", "main", "capture_option"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="graphopt")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """graphopt: capture a PyTorch model, rewrite its graph, verify, emit and measure."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug or os.environ.get("GRAPHOPT_DEBUG") == "1"
    logging.basicConfig(level=logging.DEBUG if ctx.obj["debug"] else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _set_front_end(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from graphopt.capture import set_default_front_end

    set_default_front_end(value)
    return value


def capture_option(fn):  # type: ignore[no-untyped-def]
    """``--capture auto|fx|export`` on a command that captures a model: sets the front end of every
    capture the command makes (see :func:`graphopt.capture.capture`)."""
    return click.option("--capture", type=click.Choice(["auto", "fx", "export"]), default="auto",
                        show_default=True, expose_value=False, callback=_set_front_end,
                        help="Capture front end: torch.fx tracing, torch.export, or auto (fx first, export "
                             "when fx fails or leaves modules opaque).")(fn)


# command modules register themselves on `cli`
from graphopt.cli import core  # noqa: E402,F401
from graphopt.cli import dist  # noqa: E402,F401
from graphopt.cli import bench  # noqa: E402,F401
from graphopt.cli import prune  # noqa: E402,F401


def _os_error(exc: OSError) -> str | None:
    """One line for an OSError a user can act on (disk full, no permission, read-only or virtual
    file system, missing folder); None for anything else."""
    where = exc.filename
    fixes = {
        errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere (-o / --report)"),
        errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
        errno.EACCES: ("permission denied", "choose a folder you can write to"),
        errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
        errno.EROFS: ("read-only file system", "choose a writable folder"),
        errno.ENOENT: ("no such file or folder", "check the path (its folder must exist)"),
        errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
        errno.EISDIR: ("is a folder", "give a file path"),
    }
    if exc.errno not in fixes:
        return None
    what, fix = fixes[exc.errno]
    return f"{where}: {what} ({fix})" if exc.filename else f"writing failed: {what} ({fix})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("GRAPHOPT_DEBUG") == "1"
    try:
        # not cli.main(): click turns Ctrl-C into Abort after printing an empty line
        with cli.make_context("graphopt", list(args)) as ctx:
            cli.invoke(ctx)
        code = 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        code = 1
    except click.ClickException as exc:  # usage errors: click's own message
        exc.show()
        code = 2
    except GraphoptError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted (Ctrl-C)", err=True)
        code = 130
    except OSError as exc:
        line = _os_error(exc)
        if debug:
            traceback.print_exc()
        if line is None:
            click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback "
                       "and report it)", err=True)
            code = 1
        else:
            click.echo(f"error: {line}", err=True)
            code = 2
    except Exception as exc:  # a bug: say so, in one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback "
                   "and report it)", err=True)
        code = 1
    if argv is None:
        sys.exit(code)
    return code
