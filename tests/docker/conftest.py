"""tests/docker: the container tests (marker `container`) run only when asked for with
`-m container` (.ci/run's own step after `make test`; docker/README.md): they build the
images, ~5-10 min. `make test` and a plain `pytest` deselect them."""

from __future__ import annotations

import pytest
from fixtures.docker_engine import base_image, build_image, docker_engine  # noqa: F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "container" in (config.option.markexpr or ""):
        return
    skipped = [item for item in items if item.get_closest_marker("container")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if not item.get_closest_marker("container")]
