"""TransferBackend over NIXL (UCX): one-sided WRITEs into the peer's registered KV cache.

Facts about NIXL 1.5 this relies on (checked against its UCX plugin and on this machine):

- A WRITE request ends with a UCX endpoint flush, so ``check_xfer_state() == "DONE"`` means the
  bytes are in the target's memory.
- Only ``get_agent_metadata()`` bytes (NIXL's own serialization) cross the wire; descriptors are
  rebuilt on each side from [N, 3] int64 arrays (address, nbytes, device) via ``get_xfer_descs``,
  which reads the array in C++ (8 us for 256 rows here, against 58 us for a list of tuples).
- There is no blocking wait for a transfer in the Python API (``getXferStatus`` only polls),
  so ``wait`` uses the base class's capped-sleep poll (50 us growing to 1 ms).
- A destination outside the peer's registered memory fails in ``initialize_xfer``
  (NIXL_ERR_NOT_FOUND); a peer process that died fails the next post with
  NIXL_ERR_REMOTE_DISCONNECT. NIXL's exceptions share no base class, so all of them are caught.
- On a CPU host UCX moves host memory between processes with CMA (process_vm_writev), and the
  copy happens inside ``transfer()``: ``write`` returns after most of the work is done (posting
  30 writes of 3 MB took about two thirds of the total time here). On GPUs/RDMA it is async.
- Releasing a request that is still in flight asks NIXL to cancel it and raises if it cannot;
  such handles are kept and released again at ``close()``.
- Progress. UCX needs both sides' workers progressed: the target's for the connection wire-up
  and, on transports without hardware RMA (UCX's tcp), for every write; so a target that
  nobody progresses never sees a write complete. NIXL's progress thread does that: it sleeps in
  ``poll()`` on the UCX workers' event fds and wakes on traffic, with ``pthrDelay`` as the poll
  timeout (a fallback for wake-ups UCX misses). The Python API hard-codes ``pthrDelay=0``, which
  makes that ``poll()`` return at once, so the thread spins: a whole core per process, idle or
  not. ``_new_agent`` builds the agent with a real timeout instead; a writer's own
  ``check_xfer_state`` progresses its worker as well, so completions are not held back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import numpy as np

from cache_transfer.backend import (
    TransferBackend,
    TransferError,
    TransferHandle,
    TransferState,
    endpoint_field,
)
from cache_transfer.layout import Desc
from cache_transfer.tp_layout import RankKV

_NIXL_STATES = {"DONE": TransferState.DONE, "PROC": TransferState.PENDING}

# The progress thread's poll() timeout: a wake-up UCX misses costs at most this much, and an
# idle agent wakes ten times a second. 0 is NIXL's own setting (a busy-polling thread).
PROGRESS_TIMEOUT_US = 100_000

_log = logging.getLogger(__name__)
_agent_build_lock = threading.Lock()


def _new_agent(name: str, config: Any, progress_timeout_us: int) -> Any:
    """A ``nixl_agent`` whose progress thread waits ``progress_timeout_us`` between polls.

    ``nixl_agent.__init__`` fills a fresh ``_bindings.nixlAgentConfig`` and sets its
    ``pthrDelay`` to 0 before building the C++ agent, with no parameter for it; for the length
    of the constructor the API sees a subclass of that config whose ``pthrDelay`` keeps ours.
    """
    from nixl import _api

    bindings = _api.nixlBind
    base = bindings.nixlAgentConfig
    applied = []

    class _TimedProgressConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, _hardcoded: int) -> None:
            base.pthrDelay.__set__(self, progress_timeout_us)
            applied.append(progress_timeout_us)

    with _agent_build_lock:
        bindings.nixlAgentConfig = _TimedProgressConfig
        try:
            agent = _api.nixl_agent(name, config)
        finally:
            bindings.nixlAgentConfig = base
    if not applied:
        _log.warning("NIXL's API no longer sets pthrDelay; its progress thread may busy-poll")
    return agent


def _nixl_errors() -> tuple[type[BaseException], ...]:
    from nixl import _bindings

    found = [getattr(_bindings, name) for name in dir(_bindings) if name.endswith("Error")]
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, Exception))


class NixlBackend(TransferBackend):
    """One NIXL agent with the UCX backend; see the module docstring for NIXL's behaviour."""

    backend_name = "nixl"
    writes_across_layers = True  # descriptors may name any registered layer of the peer

    def __init__(
        self,
        agent_name: str,
        num_ucx_threads: int = 0,
        progress_timeout_us: int = PROGRESS_TIMEOUT_US,
    ) -> None:
        super().__init__(agent_name)
        self._num_ucx_threads = num_ucx_threads
        self._progress_timeout_us = progress_timeout_us
        self._agent: Any = None
        self._errors: tuple[type[BaseException], ...] = ()
        self._reg_descs: Any = None
        self._local_regs: list[Any] = []  # add_local_region's registrations
        self._live: dict[int, TransferHandle] = {}
        self._unreleasable: list[Any] = []

    # -- hooks ----------------------------------------------------------------------------

    def _register(self, ranks: list[RankKV]) -> None:
        # Imported here: `import nixl` takes seconds and TCP-only deployments do not need it.
        from nixl._api import nixl_agent_config

        self._errors = _nixl_errors()
        config = nixl_agent_config(
            enable_prog_thread=True, backends=["UCX"], num_threads=self._num_ucx_threads
        )
        descs = [
            (*rank.regions.layer_desc(layer), "")
            for rank in ranks
            for layer in range(rank.regions.layout.num_layers)
        ]
        try:
            agent = _new_agent(self.agent_name, config, self._progress_timeout_us)
            if "UCX" not in agent.backends:
                raise TransferError("NIXL has no UCX plugin on this host")
            self._reg_descs = agent.register_memory(descs, ranks[0].regions.mem_type)
        except (RuntimeError, *self._errors) as exc:  # RuntimeError: no NIXL plugins at all
            raise TransferError(f"NIXL registration failed: {exc!r}") from exc
        self._agent = agent

    def _register_local(self, region: Desc, mem_type: str) -> None:
        try:
            self._local_regs.append(self._agent.register_memory([(*region, "")], mem_type))
        except self._errors as exc:
            raise TransferError(f"NIXL registration of a local region failed: {exc!r}") from exc

    def _endpoint_extra(self) -> dict[str, Any]:
        return {"metadata": self._agent.get_agent_metadata()}

    def _open_peer(self, peer: str, peer_info: dict[str, Any], dialed: None) -> None:
        # UCX endpoints come up lazily on the first request, so there is nothing to dial.
        try:
            loaded = self._agent.add_remote_agent(bytes(endpoint_field(peer_info, "metadata")))
        except (TypeError, *self._errors) as exc:
            raise TransferError(f"cannot load NIXL metadata of {peer}: {exc!r}") from exc
        loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded != peer:
            self._agent.remove_remote_agent(loaded)
            raise TransferError(f"metadata names agent {loaded!r}, endpoint says {peer!r}")

    def _start_write(
        self, handle: TransferHandle, src: np.ndarray, dst: np.ndarray, dst_layer: int
    ) -> None:
        src_mem = self._require_registered()[0].regions.mem_type
        dst_mem = self._require_peer(handle.peer)[0].regions.mem_type
        xfer = None
        try:
            # [N, 3] arrays: NIXL builds its lists from them without a Python object per row.
            local = self._agent.get_xfer_descs(src, src_mem)
            remote = self._agent.get_xfer_descs(dst, dst_mem)
            xfer = self._agent.initialize_xfer("WRITE", local, remote, handle.peer)
            if self._agent.transfer(xfer) == "ERR":
                raise TransferError(f"NIXL refused to post a WRITE to {handle.peer}")
        except (TransferError, *self._errors) as exc:
            if xfer is not None:
                self._try_release(xfer)
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"WRITE to {handle.peer} failed to start: {exc!r}") from exc
        handle._impl = xfer
        self._live[handle.id] = handle
        self._update(handle)

    def _close_peer(self, peer: str, reason: str) -> None:
        for handle in [h for h in self._live.values() if h.peer == peer]:
            self._finish(handle, TransferState.FAILED, reason)
        # The peer is forgotten either way; a failure here only means NIXL had stale metadata.
        with contextlib.suppress(*self._errors):
            self._agent.remove_remote_agent(peer)

    def _close(self) -> None:
        for handle in list(self._live.values()):
            self._finish(handle, TransferState.FAILED, "backend closed")
        stuck, self._unreleasable = self._unreleasable, []
        for xfer in stuck:
            # If it still fails, NIXL keeps it on its own leak list for agent destruction.
            with contextlib.suppress(*self._errors):
                xfer.release()
        try:
            for reg in [self._reg_descs, *self._local_regs]:
                self._agent.deregister_memory(reg)
        finally:
            self._agent = None
            self._reg_descs = None
            self._local_regs = []

    # -- transfers ------------------------------------------------------------------------

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            if handle.state == TransferState.PENDING and handle._impl is not None:
                self._update(handle)
            return handle.state

    def _update(self, handle: TransferHandle) -> None:
        try:
            status = self._agent.check_xfer_state(handle._impl)
        except self._errors as exc:
            self._finish(handle, TransferState.FAILED, repr(exc))
            return
        state = _NIXL_STATES.get(status, TransferState.FAILED)
        if state != TransferState.PENDING:
            self._finish(handle, state, "" if state == TransferState.DONE else f"NIXL: {status}")

    def _finish(self, handle: TransferHandle, state: TransferState, error: str) -> None:
        """Record a final state and give the NIXL request back at once, on every path."""
        if handle.state == TransferState.PENDING:
            handle.state, handle.error = state, error
            self._counters["failed"] += state == TransferState.FAILED
        self._live.pop(handle.id, None)
        if handle._impl is not None:
            self._try_release(handle._impl)
            handle._impl = None

    def _try_release(self, xfer: Any) -> None:
        try:
            xfer.release()
        except self._errors:
            # Still in flight and not cancellable: NIXL must keep it; retried at close().
            self._unreleasable.append(xfer)

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            if not handle.released:
                self._finish(handle, TransferState.FAILED, "released while pending")
                handle.released = True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters, live_handles=len(self._live))
