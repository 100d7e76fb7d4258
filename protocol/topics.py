"""Topic names under a namespace prefix. A node writes only its own `work/`, `result/`, `status/`."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MalformedMessage

DEFAULT_ROOT = "sc/v1"
KINDS = ("work", "assign", "result", "status")


@dataclass(frozen=True, slots=True)
class Topics:
    """`prefix` is e.g. `sc/v1/<namespace>`; deployments on one broker differ by namespace."""

    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#\x00") or self.prefix.endswith("/") \
                or not self.prefix.isascii():
            raise ValueError(f"invalid topic prefix {self.prefix!r}: ASCII, no '+', '#' or trailing '/'")

    def work(self, node: str) -> str:
        return f"{self.prefix}/work/{node}"

    def assign(self, node: str) -> str:
        return f"{self.prefix}/assign/{node}"

    def result(self, node: str) -> str:
        return f"{self.prefix}/result/{node}"

    def status(self, node: str) -> str:
        return f"{self.prefix}/status/{node}"

    def all_of(self, kind: str) -> str:
        return f"{self.prefix}/{kind}/+"

    def parse(self, topic: str) -> tuple[str, str]:
        """`prefix/kind/node` -> (kind, node); anything else is a peer's mistake."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise MalformedMessage(f"topic {topic!r} is outside prefix {self.prefix!r}")
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or parts[0] not in KINDS or not parts[1]:
            raise MalformedMessage(f"topic {topic!r} is not <prefix>/<kind>/<node>")
        return parts[0], parts[1]


def namespace_prefix(namespace: str, root: str = DEFAULT_ROOT) -> str:
    return f"{root}/{namespace}"
