"""The console policy (cola_ray.console): Ray Data's INFO off the console, files untouched."""

import logging

import pytest

from cola_ray import console


@pytest.fixture
def ray_data_logger():
    import ray.data  # noqa: F401  (configures the ray.data logger)

    logger = logging.getLogger("ray.data")
    levels = [(h, h.level) for h in logger.handlers]
    yield logger
    for h, level in levels:
        h.setLevel(level)


def test_verbose_requested(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose_requested()
    assert console.verbose_requested(True)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose_requested()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose_requested()


def test_quiet_raises_only_console_handlers(ray_data_logger, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    before = {id(h): h.level for h in ray_data_logger.handlers}
    changed = console.quiet_ray(verbose=False)
    assert changed.get("ray.data") == logging.WARNING
    for h in ray_data_logger.handlers:
        if type(h).__name__ == "PlainRayHandler":  # Ray Data's console handler
            assert h.level >= logging.WARNING
        elif not isinstance(h, logging.StreamHandler) or type(h).__name__ == "SessionFileHandler":
            assert h.level == before[id(h)]  # files (and pytest's own handlers) untouched


def test_verbose_leaves_ray_alone(ray_data_logger, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    before = [h.level for h in ray_data_logger.handlers]
    assert console.quiet_ray(verbose=False) == {}
    assert [h.level for h in ray_data_logger.handlers] == before
