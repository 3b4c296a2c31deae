"""Stopping a long-running command on SIGTERM/SIGINT (orchestration/management/stopping.py):
a signal at any moment of the wait between two polls, or during the handler of another one,
stops it. threading.Event, used before, takes a lock in set() and holds it for moments in
wait(): a handler run in such a moment waited for that lock for ever."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.engine import ROOT

# Sends SIGTERM at each bytecode step, one step per pass, of what runs while the process waits
# for a stop (the wait between two polls, and the handler of a first SIGTERM), until a pass
# ends before its step is reached. A deadlock ends the process after 20 s, with its stack.
A_SIGNAL_AT_EVERY_STEP = """
import faulthandler, itertools, os, signal, sys, time

from orchestration.management.stopping import StopRequest, stop_on_signals

faulthandler.dump_traceback_later(20, exit=True)


def signal_at(step, wait):
    # Whether the step was reached; a wait the signal came during ends with it, not at its
    # timeout (one between the flag's check and the select is seen through the pipe).
    count = 0
    sent = None

    def each_opcode(frame, event, arg):
        nonlocal count, sent
        if event == "opcode":
            count += 1
            if count == step:
                sent = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
        return each_opcode

    def calls(frame, event, arg):
        frame.f_trace_opcodes = True
        return each_opcode

    sys.settrace(calls)
    try:
        wait()
        ended = time.monotonic()
    finally:
        sys.settrace(None)
    assert sent is None or sent > ended or ended - sent < 0.5, (step, ended - sent)
    return count >= step


for what in ("wait", "handler"):
    for step in itertools.count(1):
        with stop_on_signals() as stop:
            if what == "wait":  # a signal while waiting between two polls
                reached = signal_at(step, lambda: stop.wait(1))
            else:  # a second signal while the first one's handler runs
                reached = signal_at(step, lambda: os.kill(os.getpid(), signal.SIGTERM))
            if reached:
                assert stop.is_set(), (what, step)
                assert stop.wait(60), (what, step)  # a stop asked for ends any later wait at once
        if not reached:
            break
    print(f"{what}: stopped at each of {step - 1} steps")
"""


@pytest.mark.subprocess
def test_a_stop_signal_at_any_moment_of_the_wait_or_of_another_signals_handler_stops_the_command():
    result = subprocess.run(
        [sys.executable, "-c", A_SIGNAL_AT_EVERY_STEP],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = r"wait: stopped at each of \d+ steps\nhandler: stopped at each of \d+ steps\n"
    assert re.fullmatch(expected, result.stdout), result.stdout + result.stderr
