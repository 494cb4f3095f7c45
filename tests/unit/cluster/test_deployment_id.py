"""Shared-memory names: two deployments on one host never share (or unlink) each other's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from cluster.deployment import deployment_id


def _under_ray(monkeypatch: pytest.MonkeyPatch, job_id: str, gcs_address: str) -> None:
    context = SimpleNamespace(get_job_id=lambda: job_id, gcs_address=gcs_address)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)


def test_two_local_clusters_with_the_same_first_job_differ(monkeypatch) -> None:
    # Every fresh local Ray numbers its first job 01000000; only the GCS tells them apart.
    _under_ray(monkeypatch, "01000000", "127.0.0.1:41313")
    first = deployment_id()
    _under_ray(monkeypatch, "01000000", "127.0.0.1:52001")
    assert deployment_id() != first


def test_restarts_in_one_cluster_keep_their_id(monkeypatch) -> None:
    _under_ray(monkeypatch, "02000000", "10.0.0.5:6379")
    first = deployment_id()
    _under_ray(monkeypatch, "02000000", "10.0.0.5:6379")
    assert deployment_id() == first
    assert first.startswith("02000000")
