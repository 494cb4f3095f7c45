"""Stand-ins for decode instances, speaking the real splitwise protocol over real zmq sockets.
Used by the prepare-pool tests and benchmark."""

from __future__ import annotations

import queue
import threading
import time

from cluster.instances.decode_picker import DecodePeer
from engine.config import Role
from engine.protocol.channels import Inbox, SenderPool
from engine.protocol.identity import InstanceId
from engine.protocol.splitwise import CancelDecode, DecodeAllocation, DecodeTask


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
                reply = DecodeAllocation(
                    msg.request_id, self.name_, ok, [1, 2] if ok else [], "", 50
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
