#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    from orchestration.management.stopping import INTERRUPTED

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        # A setting the environment gives wrong (config/env.py names the variable): one line, as
        # a command's own errors are, unless --traceback asks for the whole story.
        if "--traceback" in sys.argv:
            raise
        sys.stderr.write(f"ImproperlyConfigured: {exc}\n")
        sys.exit(1)
    except SystemExit as exc:
        # How a command's error ends (a CommandError: its line on stderr, then its status), and
        # argparse's --help: what it wrote to stdout before is still to flush, and failed at exit
        # with status 120 when the reader had left (`manage.py submit_workflow F --wait | head -1`).
        if not _flush_stdout() and not exc.code:
            sys.exit(1)  # a success whose output no one read, as below
        if exc.code == INTERRUPTED:
            _end_by_sigint()
        raise
    except BrokenPipeError:
        if not _stdout_broken():
            raise  # another pipe or socket: the command's own error
        # The reader of the output left (`manage.py workflow_status ID | head -1`): end as other
        # command-line tools do, without a traceback.
        _stdout_discard()
        sys.exit(1)
    if not _flush_stdout():
        sys.exit(1)


def _flush_stdout() -> bool:
    """Write what stdout still buffers here, not at exit, where a broken pipe is a message no
    one can catch (exit status 120); False when its reader is gone."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_discard()
        return False
    return True


def _stdout_discard() -> None:
    """What is still buffered would be written (and fail) again at exit: stdout goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _stdout_broken() -> bool:
    """Whether stdout's reader is gone: poll reports an error on a pipe's end, a hang-up on a
    socket's (a log shipper's connection; with POLLERR alone its broken pipe was a traceback)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is no file
        return False


def _end_by_sigint() -> None:
    """End as a KeyboardInterrupt no one caught does, by SIGINT: a shell running a script goes
    on past a command that ^C reached unless the command died of it (bash's "wait and
    cooperative exit"), and every ^C in `for f in specs/*; do manage.py submit_workflow $f
    --wait; done` then submitted the next spec."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    main()
