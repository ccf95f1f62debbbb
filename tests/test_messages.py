"""Clear errors, early (issue 13, section 3): the messages of failures outside the recipe schema.

The hub is unreachable on the machines the tests run on; these tests make sure of it, so they
run the same where a network exists.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from compress.errors import DataError, ModelLoadError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every outgoing connection fails as on a machine without a route (and HF_HUB_OFFLINE
    unset, so only compress's own probe stands between the user and the hub client's retries)."""
    import huggingface_hub.constants

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("no_network")
def test_unreachable_hub_fails_at_once_and_says_why() -> None:
    from compress.models import load_model

    started = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("someorg/somemodel")
    assert time.monotonic() - started < 10  # the hub client's retries take about 30 s
    message = info.value.message
    assert "'someorg/somemodel'" in message and "hub id" in message
    assert "the hub is out of reach (cannot connect to huggingface.co" in message
    assert "Network is unreachable" in message
    assert info.value.hint is not None and "smollm2-135m" in info.value.hint


def test_hub_messages_are_printed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from compress import cli

    hub_logger = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hub_logger, "handlers", [logging.StreamHandler()])
    monkeypatch.setattr(hub_logger, "level", logging.NOTSET)
    cli._setup_logging(verbose=False)
    assert hub_logger.handlers == []  # its records reach the one handler of the CLI
    assert hub_logger.level == logging.ERROR  # retry-by-retry warnings are not shown


def test_empty_dataset_file_says_it_is_empty(tmp_path: Path) -> None:
    from compress.data import load_texts

    empty = tmp_path / "calibration.txt"
    empty.write_text("")
    with pytest.raises(DataError) as info:
        load_texts(str(empty), "calibration")
    assert info.value.message == f"dataset file {empty} (from {str(empty)!r}) is empty"
    assert info.value.hint is not None and "one text per line" in info.value.hint
