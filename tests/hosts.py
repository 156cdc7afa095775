"""Separate hosts on one machine: network namespaces (`ip netns`) joined by veth links to a
bridge, each with a hosts file of its own, and what the compose file says each service runs.

The bridge's own address (GATEWAY) is where the hosts reach the deployment's servers: a
redis-server and a SeaweedFS bound to it, and the shared PostgreSQL of loopback through a
forwarder of ours (it listens on loopback only)."""

import os
import re
import shutil
import socket
import subprocess
import threading
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import yaml

SUBNET = "10.213.7"
GATEWAY = f"{SUBNET}.1"
_NETNS_ETC = Path("/etc/netns")


def cannot_make_hosts() -> str | None:
    """Why namespaces cannot be made here; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """`with Hosts(["api-1", …]) as hosts:` a namespace per name on one bridge; each name's
    address is `hosts.address[name]`, and `hosts.names` resolve in every namespace to the
    bridge's address (`aliases`)."""

    def __init__(self, names: list[str], aliases: list[str]) -> None:
        tag = uuid.uuid4().hex[:6]
        self._bridge = f"mfbr{tag}"
        self.namespace = {name: f"mf-{tag}-{name}" for name in names}
        self.address = {name: f"{SUBNET}.{10 + n}" for n, name in enumerate(names)}
        self._aliases = aliases
        self._links: list[str] = []

    def __enter__(self) -> "Hosts":
        try:
            _ip("link", "add", self._bridge, "type", "bridge")
            _ip("addr", "add", f"{GATEWAY}/24", "dev", self._bridge)
            _ip("link", "set", self._bridge, "up")
            for n, (name, namespace) in enumerate(self.namespace.items()):
                outside, inside = f"{self._bridge}o{n}", f"{self._bridge}i{n}"
                _ip("netns", "add", namespace)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._links.append(outside)
                _ip("link", "set", outside, "master", self._bridge, "up")
                _ip("link", "set", inside, "netns", namespace)
                _ip("-n", namespace, "addr", "add", f"{self.address[name]}/24", "dev", inside)
                _ip("-n", namespace, "link", "set", inside, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
                # `ip netns exec` mounts /etc/netns/<namespace>/hosts over /etc/hosts.
                etc = _NETNS_ETC / namespace
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n{GATEWAY} {' '.join(self._aliases)}\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def command(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run on host `name`."""
        return ["ip", "netns", "exec", self.namespace[name], *argv]

    def __exit__(self, *exc_info: object) -> None:
        for namespace in self.namespace.values():
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "delete", namespace)
            shutil.rmtree(_NETNS_ETC / namespace, ignore_errors=True)
        for link in self._links:
            with suppress(subprocess.CalledProcessError):
                _ip("link", "delete", link)
        with suppress(subprocess.CalledProcessError):
            _ip("link", "delete", self._bridge)


class TcpForwarder:
    """`with TcpForwarder((GATEWAY, 5432), ("127.0.0.1", 5432)):` every connection to the
    first address is carried to the second, both ways, byte for byte."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server(listen)
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "TcpForwarder":
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def __exit__(self, *exc_info: object) -> None:
        self._server.close()
        for connection in self._open:
            with suppress(OSError):
                connection.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


# The compose file ----------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}` and `${NAME:?message}`."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        given = variables.get(name, "")
        if given:
            return given
        if op == ":?":
            raise ValueError(f"compose.yaml needs {name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(value, text)


def compose_services(path: Path, variables: dict[str, str]) -> dict[str, Any]:
    """The compose file's services, as `docker compose config` would resolve them."""
    resolved = yaml.safe_load(interpolate(path.read_text(), variables))
    return dict(resolved["services"])


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    return {name: "" if value is None else str(value) for name, value in service.get("environment", {}).items()}
