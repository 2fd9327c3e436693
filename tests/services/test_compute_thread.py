"""ComputeThread: every call, from whichever thread, runs on the one compute thread (one OpenMP team)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.compute_thread import ComputeThread


def test_calls_from_many_threads_all_run_on_one_other_thread():
    compute = ComputeThread()
    try:
        with ThreadPoolExecutor(8) as callers:
            idents = set(callers.map(lambda _: compute.run(threading.get_ident), range(64)))
        assert len(idents) == 1 and threading.get_ident() not in idents
    finally:
        compute.close()


def test_a_call_from_the_compute_thread_runs_inline_instead_of_deadlocking():
    compute = ComputeThread()
    try:
        nested = compute.run(lambda: compute.run(threading.get_ident))
        assert nested == compute.run(threading.get_ident)
    finally:
        compute.close()


def test_results_and_exceptions_reach_the_caller():
    compute = ComputeThread()
    try:
        doubled = compute.wrap(lambda x: x * 2)
        assert torch.equal(doubled(torch.arange(3)), torch.tensor([0, 2, 4]))
        with pytest.raises(KeyError, match="missing"):
            compute.run(lambda: {}["missing"])
    finally:
        compute.close()
