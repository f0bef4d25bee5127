"""The network side of `klein up`: which ports are free, which Host headers the API answers, where it is reached."""

from __future__ import annotations

import socket


def listened_on(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(first: int, count: int, host: str, taken: set[int]) -> list[int]:
    """`count` ports from `first` upwards that nothing listens on (another stack on this machine has the
    defaults, say); those in `taken` are skipped."""
    ports: list[int] = []
    port = first
    while len(ports) < count:
        if port not in taken and not listened_on(host, port):
            ports.append(port)
        port += 1
    return ports


def allowed_hosts(bind: str) -> list[str]:
    """The Host headers the API answers: localhost and the address it binds; on every interface, this machine's
    name and every address of its interfaces too, so other machines reach it by any of them (set
    KLEIN_ALLOWED_HOSTS or KLEIN_PUBLIC_BASE_URL for other names clients use)."""
    hosts = ["localhost", "127.0.0.1"]
    if bind in ("0.0.0.0", "::", ""):
        import psutil

        hosts.append(socket.gethostname())
        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                ip = address.address
                if address.family in (socket.AF_INET, socket.AF_INET6) and "%" not in ip and ip not in hosts:
                    hosts.append(ip)  # link-local IPv6 (with a %zone) cannot be a Host header
    elif bind not in hosts:
        hosts.append(bind)
    return hosts


def reachable_at(bind: str, port: int, hosts: list[str], scheme: str = "http") -> list[str]:
    """The URLs to print: the bound address, or on every interface each non-loopback IPv4 address."""
    if bind not in ("0.0.0.0", "::", ""):
        return [f"{scheme}://{bind}:{port}"]
    ips = [h for h in hosts if h.count(".") == 3 and h.replace(".", "").isdigit() and not h.startswith("127.")]
    return [f"{scheme}://127.0.0.1:{port}", *(f"{scheme}://{ip}:{port}" for ip in ips)]
