#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
        sys.stdout.flush()  # here, not at exit, where a broken pipe is a message no one can catch
    except BrokenPipeError:
        if not _stdout_broken():
            raise  # another pipe or socket: the command's own error
        # The reader of the output left (`manage.py workflow_status ID | head -1`): end as other
        # command-line tools do, without a traceback. What is still buffered would be written
        # (and fail) again at exit: stdout goes nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _stdout_broken() -> bool:
    """Whether stdout is a pipe whose reader is gone (poll reports an error on its end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is no file
        return False


if __name__ == "__main__":
    main()
