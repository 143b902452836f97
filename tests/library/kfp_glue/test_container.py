"""sftpipe.kfp_glue.container: a step names the container it runs in only when there is one
to name (the container tests check it inside real containers: tests/docker)."""

from __future__ import annotations

import json

from sftpipe.kfp_glue import container


def test_no_container_no_identity(monkeypatch, tmp_path):
    monkeypatch.setattr(container, "_MARKERS", (tmp_path / "absent",))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv(container.IMAGE_ENV, "repo/x:1@sha256:" + "a" * 64)
    assert container.identity() is None


def test_a_marked_machine_without_id_or_image_is_not_a_step_container(monkeypatch, tmp_path):
    """A sandbox that is itself a container runs the subprocess runner's steps: not recorded."""
    marker = tmp_path / ".dockerenv"
    marker.touch()
    monkeypatch.setattr(container, "_MARKERS", (marker,))
    monkeypatch.setattr(container, "container_id", lambda: "")
    monkeypatch.delenv(container.IMAGE_ENV, raising=False)
    assert container.identity() is None


def test_identity_and_its_tag(monkeypatch, tmp_path):
    marker = tmp_path / ".dockerenv"
    marker.touch()
    monkeypatch.setattr(container, "_MARKERS", (marker,))
    monkeypatch.setattr(container, "container_id", lambda: "b" * 64)
    image = "repo/x:1@sha256:" + "a" * 64
    monkeypatch.setenv(container.IMAGE_ENV, image)
    found = container.identity()
    assert found is not None and found["container_id"] == "b" * 64 and found["image"] == image
    key, value = container.as_tag("clean", found)
    assert key == "sftpipe.container.clean" and json.loads(value) == found
    assert container.describe("clean", found).startswith(f"[clean] ran in container {'b' * 12}")
