# The rendezvous port of a launch is chosen below the kernel's ephemeral range: a port the kernel handed out once
# (bind to 0) could be given to a gloo connection of a concurrent launch before the launcher bound it (seen in CI).
import socket

from pptk.launch.ranks import _ephemeral_low, free_port


def test_the_port_is_free_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), (ports, low)
    assert len(ports) > 1  # sampled, so two launches started together do not pick the same one
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))
