"""Stand-ins for a prefill instance's hooks and for decode instances, speaking the real
splitwise protocol over real zmq sockets. Used by the prepare-pool tests and benchmark."""

from __future__ import annotations

import queue
import threading
import time

from cluster.instances.decode_picker import DecodePeer
from cluster.instances.prepare_pool import PrepareHooks
from engine.config import Role
from engine.protocol.channels import Inbox, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask
from engine.request import Request


class FakeDecode(threading.Thread):
    """Answers DecodeTasks: 'accept', 'refuse', 'silent' (never) or a delay in seconds."""

    def __init__(self, index: int, policy: str | float = "accept", free: int = 100) -> None:
        super().__init__(daemon=True)
        self.inbox = Inbox("127.0.0.1", accept=(DecodeTask, CancelDecode))
        self.name_ = InstanceId(Role.DECODE, index)
        self.policy = policy
        self.free = free
        self.tasks: list[str] = []
        self.cancels: list[str] = []
        self._replies: queue.Queue = queue.Queue()
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        senders = SenderPool()
        replier = threading.Thread(target=self._reply_loop, daemon=True)
        replier.start()
        while not self._halt.is_set():
            msg = self.inbox.recv(0.05)
            if isinstance(msg, CancelDecode):
                self.cancels.append(msg.request_id)
            elif isinstance(msg, DecodeTask):
                self.tasks.append(msg.request_id)
                if self.policy == "silent":
                    continue
                ok = self.policy != "refuse"
                blocks = [1, 2] if ok else []
                reply = DecodeAllocation(
                    msg.request_id, self.name_, ok, blocks, "", 50, msg.attempt
                )
                delay = self.policy if isinstance(self.policy, float) else 0.0
                self._replies.put((time.monotonic() + delay, msg.reply_to, reply))
        self._replies.put(None)
        replier.join(2)
        senders.close()

    def _reply_loop(self) -> None:
        """Answers after the policy's delay without holding up later tasks, like a real D whose
        answer latency does not serialize its requests."""
        senders = SenderPool()
        while (item := self._replies.get()) is not None:
            due, address, reply = item
            time.sleep(max(0.0, due - time.monotonic()))
            senders.send(address, reply)
        senders.close()

    def peer(self) -> DecodePeer:
        return DecodePeer(self.name_, self.inbox.address, 200, self.free)

    def close(self) -> None:
        self._halt.set()
        self.join(2)
        self.inbox.close()


class FakePrefill:
    """Hooks recording what the pool asked for; `capacity` reservations at most."""

    def __init__(self, capacity: int = 100) -> None:
        self.inbox = Inbox("127.0.0.1", accept=(DecodeAllocation,))
        self.capacity = capacity
        self.reserved: set[str] = set()
        self.admitted: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.lock = threading.Lock()

    def hooks(self) -> PrepareHooks:
        return PrepareHooks(
            self.reserve,
            self.unreserve,
            self.admit,
            self.fail,
            lambda: True,
            (2,),
            self.inbox.address,
            InstanceId(Role.PREFILL, 0),
        )

    def reserve(self, request: Request) -> bool:
        with self.lock:
            if len(self.reserved) >= self.capacity:
                return False
            self.reserved.add(request.request_id)
            return True

    def unreserve(self, rid: str) -> None:
        with self.lock:
            self.reserved.remove(rid)

    def admit(self, prep, peer, reply) -> None:
        with self.lock:
            self.admitted[prep.request.request_id] = str(peer.name)
            self.reserved.remove(prep.request.request_id)

    def fail(self, msg, error: str, overloaded: bool = False) -> None:
        with self.lock:
            self.failed[msg.request_id] = error


def route_replies(prefill: FakePrefill, pool) -> None:
    """P's control thread in miniature: hand D's answers to the pool."""
    while True:
        try:
            msg = prefill.inbox.recv(0.05)
        except Exception:
            return
        if msg is not None:
            pool.on_allocation(msg)
