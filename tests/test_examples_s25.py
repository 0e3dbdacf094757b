"""The examples a newcomer runs first: a clean Ctrl-C, a word when no service answers, one
line for a control error (newcomer hunt: tracebacks, or silence that looked like a hang)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from livemask.client import Subscriber
from livemask.protocol import encode
from tests.conftest import free_tcp_address

ROOT = Path(__file__).resolve().parents[1]


def test_messages_says_once_when_nothing_comes(capsys: pytest.CaptureFixture[str]) -> None:
    """A subscriber before its service: one hint on stderr, then the messages as usual."""
    address = free_tcp_address()

    def publish_later() -> None:  # the service comes up after the hint
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.bind(address)
        try:
            for seq in range(60):
                time.sleep(0.05)
                pub.send_multipart(encode("measurements", {"frame_id": seq, "seq": seq}))
        finally:
            pub.close(linger=0)
            ctx.term()

    with Subscriber(address, topics=("measurements",)) as sub:
        stream = sub.messages(silent_hint_s=0.5)
        threading.Timer(1.2, publish_later).start()
        msg = next(stream)
        assert msg.topic == "measurements"
    err = capsys.readouterr().err
    assert err.count(f"no messages from {address} after 0.5 s") == 1
    assert "livemask serve" in err


@pytest.mark.parametrize("script", ["subscriber.py", "controller.py"])
def test_an_example_ends_on_ctrl_c_without_a_traceback(script: str) -> None:
    address = free_tcp_address()
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / script), address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    hint = proc.stderr.readline()  # waits for the hint: the example is in its loop by then
    assert f"no messages from {address} after 5 s" in hint
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
