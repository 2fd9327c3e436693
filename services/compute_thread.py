"""One OS thread for all of a serving process's torch work.

PyTorch's CPU kernels run on OpenMP, and libgomp gives every OS thread that enters a parallel region a
thread team of its own. Once a process's teams hold more threads than it has cores, libgomp stops letting
idle workers spin and puts them to sleep after every region, so each of a step's ~500 small ops pays a
futex wake-up. Measured on 2 cores (tiny world, one step): 72 ms on the thread that loaded the model,
192 ms on a second thread; a gateway stepping on its batcher thread after loading on its main thread
took 1.8x the engine's own step. Routing every torch call through one thread keeps a single team.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class ComputeThread:
    """Runs callables on one dedicated thread, one at a time, and hands back their result or exception.

    A call made from the compute thread itself runs inline, so code already on it may call run again.
    """

    def __init__(self, name: str = "torch-compute"):
        self._ident: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._remember)

    def _remember(self) -> None:
        self._ident = threading.get_ident()

    def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if threading.get_ident() == self._ident:
            return function(*args, **kwargs)
        return self._executor.submit(function, *args, **kwargs).result()

    def wrap(self, function: Callable[P, R]) -> Callable[P, R]:
        """function, made to run on the compute thread whoever calls it."""
        def on_compute_thread(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.run(function, *args, **kwargs)
        return on_compute_thread

    def close(self) -> None:
        self._executor.shutdown(wait=True)
