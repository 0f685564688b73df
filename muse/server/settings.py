"""A server's settings: the pipeline `Limits` it enforces (composed, not retyped) and its own connection limits and
timeouts; `muse serve --help` lists both as flags derived from these fields."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from muse.options import Limits

# Stricter than the library's `Limits`: a server answers strangers, so one request may take less of the machine.
# max_images counts candidates: 64 lets a request ask for 8 images at the most candidates a server allows.
# max_row_steps: about 10-20 s of engine time on the bundled model on a 2-core CPU (1.1-3.4 ms a row-step measured,
# under load); 8 images best of 8 (3168) and a 64 px image outpainted by 64 px per side (3456) fit, the same image
# outpainted by 192 px per side (24192, 100-120 s) does not.
SERVER_LIMITS = Limits(max_steps=100, max_images=64, max_candidates=8, max_pixels=512 * 512, max_pad=256,
                       max_iterations=8, max_prompt_chars=2000, max_row_steps=6000)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # always allowed in the Host header


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerSettings:
    """Limits and timeouts of one server; `muse serve --help` lists them as flags, with these texts."""

    limits: Limits = field(default=SERVER_LIMITS, metadata={"help": "what one request may ask for"})
    max_rows: int = _setting(64, "forward rows in flight in the engine (a guided image counts twice)")
    max_queued: int = _setting(64, "tasks waiting for the engine; beyond: 429 with Retry-After")
    max_body_bytes: int = _setting(16 << 20, "largest request body, in bytes")
    request_timeout: float = _setting(120.0, "seconds from arrival to the result; past it the task is cancelled (504)")
    body_timeout: float = _setting(10.0, "seconds for a client to send its headers (408), and then its whole body "
                                         "(408, or the connection closed once the reply is sent)")
    keep_alive: int = _setting(5, "seconds an idle connection stays open")
    backlog: int = _setting(2048, "connections the kernel queues before accepting")
    # None: from the open-file limit (RLIMIT_NOFILE), so that accept() never runs out of file descriptors.
    max_connections: int | None = _setting(None, "open connections; beyond, the one that has waited longest on its "
                                                 "client is closed (default: the open-file limit less 64)")
    # None: measured at start-up, so that previews take at most PREVIEW_SHARE of a stream's time.
    preview_every: int | None = _setting(None, "steps between stream previews (default: measured at start-up)")
    retry_after: int = _setting(1, "seconds, in 429 replies")
    # Empty: the local names only (LOCAL_HOSTS); `muse serve` adds the address it binds. "*" allows any Host.
    allowed_hosts: tuple[str, ...] = _setting((), "Host header values accepted besides localhost, 127.0.0.1, [::1] "
                                                  "and the bound address (behind a proxy: the public name; * for any)")

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):  # its own fields are checked by Limits itself
            raise TypeError(f"limits must be a muse.options.Limits, got {type(self.limits).__name__}")
        if isinstance(self.allowed_hosts, str):
            raise TypeError(f"allowed_hosts must be a tuple of names, got the string {self.allowed_hosts!r}")
        object.__setattr__(self, "allowed_hosts", tuple(host.lower() for host in self.allowed_hosts))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("limits", "allowed_hosts") and value is not None and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")

    def replace(self, **changes: Any) -> ServerSettings:
        """These settings with fields of their own or of `limits` replaced: `settings.replace(max_steps=10)`."""
        limit_names = {f.name for f in dataclasses.fields(Limits)}
        limits = {name: changes.pop(name) for name in list(changes) if name in limit_names}
        if limits:
            changes["limits"] = dataclasses.replace(self.limits, **limits)
        return dataclasses.replace(self, **changes)

    def hosts(self) -> frozenset[str] | None:
        """The Host header names accepted (without port, lowercase, IPv6 without brackets); None: any."""
        if "*" in self.allowed_hosts:
            return None
        return frozenset(LOCAL_HOSTS + tuple(host.strip("[]") for host in self.allowed_hosts))

    def public(self) -> dict:
        """The settings as the editor's /config shows them: one flat dictionary, the limits beside the others."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "limits"}
        return {**dataclasses.asdict(self.limits), **values, "allowed_hosts": list(self.allowed_hosts)}


# Flags: one per field of Limits and of ServerSettings but `limits` and `allowed_hosts` (which takes a list).
def _flag_fields() -> list[tuple[dataclasses.Field, Any]]:
    defaults = ServerSettings()
    fields = [(f, getattr(defaults.limits, f.name)) for f in dataclasses.fields(Limits)]
    fields += [(f, getattr(defaults, f.name)) for f in dataclasses.fields(ServerSettings)
               if f.name not in ("limits", "allowed_hosts")]
    return fields


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits and timeouts")
    for f, default in _flag_fields():
        kind = float if isinstance(default, float) else int
        group.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default, metavar="N",
                           help=f.metadata["help"] + ("" if default is None else " (default: %(default)s)"))
    hosts = next(f for f in dataclasses.fields(ServerSettings) if f.name == "allowed_hosts")
    group.add_argument("--allowed-hosts", default=None, metavar="HOST,...", help=hosts.metadata["help"])


def settings_from_arguments(args: argparse.Namespace) -> ServerSettings:
    """The settings the flags of `add_setting_arguments` give; ValueError naming a bad one."""
    values = {f.name: getattr(args, f.name) for f, _ in _flag_fields()}
    hosts = tuple(host.strip() for host in (args.allowed_hosts or "").split(",") if host.strip())
    return ServerSettings().replace(**values, allowed_hosts=hosts)
