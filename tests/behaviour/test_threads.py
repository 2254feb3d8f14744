"""The CPU threads of the local forward passes: ``--threads``, and a default that leaves busy cores alone."""

from __future__ import annotations

import os

import pytest
import torch

from lorafid.cli import behave
from lorafid.cli.commands import build_parser


@pytest.mark.parametrize(("load", "expected"), [(0.1, 4), (1.4, 3), (2.6, 1), (9.0, 1)])
def test_the_default_is_one_thread_per_idle_core(monkeypatch: pytest.MonkeyPatch, load: float, expected: int) -> None:
    """4 cores: at load 0.1 all four; at 2.6 one (not torch's four, which would wait for busy cores)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0), raising=False)
    assert behave.idle_cores() == expected


def test_without_a_load_average_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load() -> tuple[float, float, float]:
        raise OSError("no load average")

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", no_load, raising=False)
    assert behave.idle_cores() == 2


def test_use_threads_sets_torch_and_prefers_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(behave, "idle_cores", lambda: 1)
    try:
        assert behave.use_threads(3) == 3 and torch.get_num_threads() == 3
        assert behave.use_threads(None) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "command", [["behave", "b", "f"], ["probe", "b", "f", "--endpoint", "http://x", "--model", "m"]]
)
def test_both_commands_take_threads(command: list[str]) -> None:
    parser = build_parser()
    assert parser.parse_args([*command, "--threads", "2"]).threads == 2
    assert parser.parse_args(command).threads is None  # the default: idle_cores() when the command runs
