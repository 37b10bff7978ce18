"""Private network namespaces that hold only loopback.

dcmtk's storescp and dcmqrscp cannot choose a bind address and listen on every
interface; inside a namespace of our own, "every interface" is 127.0.0.1 of
that namespace, so nothing is reachable from outside.
"""

from __future__ import annotations

import os
import subprocess
import uuid


class NetNS:
    def __init__(self) -> None:
        self.name = f"xdsi-{uuid.uuid4().hex[:10]}"

    def __enter__(self) -> "NetNS":
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)
        return self

    def cmd(self, *args: str) -> list[str]:
        """Prefix a command so it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def available() -> bool:
    return os.geteuid() == 0
