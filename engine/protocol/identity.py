"""Who is who in a deployment: typed identities of instances and cache messagers.

Their `str()` is the Ray actor name (`prefill-0`, `messager-0`) and the label in logs, stats and
metrics; nothing parses names back: code that needs the role or the index reads the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Role


@dataclass(frozen=True, order=True)
class InstanceId:
    """A prefill, decode or mixed instance: its role and its index among that role's instances."""

    role: Role
    index: int

    def __str__(self) -> str:
        return f"{self.role.value}-{self.index}"


@dataclass(frozen=True, order=True)
class MessagerId:
    """The cache messager of instance `role`-`index`: every prefill instance has one from
    start-up (`messager-0`); an elastic instance born in another role gets one on its first
    switch to prefill (`messager-decode-1`)."""

    index: int
    role: Role = Role.PREFILL  # the role its instance was born in (its name's)

    @property
    def prefill(self) -> InstanceId:
        """The instance whose KV it moves."""
        return InstanceId(self.role, self.index)

    def __str__(self) -> str:
        if self.role is Role.PREFILL:
            return f"messager-{self.index}"
        return f"messager-{self.role.value}-{self.index}"


WorkerId = InstanceId | MessagerId  # every actor the supervisor watches
