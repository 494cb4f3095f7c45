"""The prefill instance's ordered line to its messager (the GPU path runs in tests/gpu)."""

from __future__ import annotations

import torch

from cache_transfer.layer_signals import MessagerLink


def test_cpu_link_sends_at_once_in_order() -> None:
    sent: list[str] = []
    link = MessagerLink(sent.append, torch.device("cpu"), "p")
    link.send("plan")
    link.layer_written("layer-0")
    assert sent == ["plan", "layer-0"]  # no thread: the CPU wrote the layer before the hook ran
    link.send("done")
    link.close()
    assert sent == ["plan", "layer-0", "done"]
    assert link.dropped_signals == 0
