"""``watch --pub`` and ``dashboard --connect`` take the address of a running service: a
bind's port (``*``, 0) or a transport ZeroMQ cannot connect over is a one-line usage error
(exit 2). Before, each ended in a traceback (exit 1), after the dashboard had bound its
HTTP port (ops hunt)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from livemask.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [
    ["watch", "--duration", "0.2", "--pub"],
    ["dashboard", "--listen", "127.0.0.1:0", "--connect"],
])
@pytest.mark.parametrize(("address", "why"), [
    ("tcp://127.0.0.1:*", "port * picks a free port when the service binds"),
    ("tcp://127.0.0.1:0", "port 0 picks a free port when the service binds"),
    ("udp://127.0.0.1:5", "is not an address to connect to (not tcp://, ipc:// or inproc://)"),
])
def test_a_bind_address_is_refused_where_a_service_is_connected_to(
    command: list[str], address: str, why: str
) -> None:
    result = runner.invoke(app, [*command, address])
    assert result.exit_code == 2, result.output
    assert why in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["watch", "--duration", "0.2", "--pub"],
                                     ["dashboard", "--listen", "127.0.0.1:0", "--connect"]])
def test_a_malformed_address_is_not_told_to_use_a_binds_port(command: list[str]) -> None:
    """'127.0.0.1:5555' was told "(port * picks a free one)", which these flags then refuse
    (newcomer hunt)."""
    result = runner.invoke(app, [*command, "127.0.0.1:5555"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "'127.0.0.1:5555' is not a valid address: give tcp://HOST:PORT" in text
    assert "*" not in text
