"""Result storage that a caller reuses from one kernel call to the next.

A fresh result tensor of a large panel is memory the operating system hands over zeroed, page
by page, on first touch; glibc returns every freed block above 32 MiB at once, so a loop that
fits ticker group after ticker group pays those page faults again for every group.  On the
2-core VM of ``benchmarks/README.md`` that was 8 to 24% of the kernel's time at 3,000 tickers
x 7,500 days, spent on pages whose contents are overwritten anyway.

:class:`OutputBuffers` keeps the storage of one :func:`~sensitivity.model.quadratic_fit` and
one :func:`~sensitivity.sensitivity.daily_sensitivity` (each asks for its own named buffer) so
that the next call with the same buffers writes into it: a streaming consumer -- a loop that
writes or reduces each group's results before it fits the next one -- passes one instance to
every call.  It is opt-in and local: nothing is kept behind the caller's back, and dropping the
instance (or :meth:`OutputBuffers.release`) gives the memory back.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["OutputBuffers", "empty"]


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor; on the CPU backed by numpy (its large buffers use huge pages)."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))
    return torch.empty(shape, dtype=dtype, device=device)


def _on(tensor: Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` lives on ``device`` (``cuda`` without an index: any CUDA device)."""
    here = tensor.device
    return here.type == device.type and (device.index is None or here.index == device.index)


class OutputBuffers:
    """Storage for kernel results, kept from call to call (see the module's docstring).

    Pass the same instance as ``out`` to :func:`~sensitivity.model.quadratic_fit` and
    :func:`~sensitivity.sensitivity.daily_sensitivity` in a loop over ticker groups::

        buffers = OutputBuffers()
        for g0 in range(0, n, group):
            fit = quadratic_fit(x[:, g0:g0 + group], y[:, g0:g0 + group], window=252,
                                min_obs=126, out=buffers)
            sens = daily_sensitivity(fit, x[:, g0:g0 + group], out=buffers)
            write(fit, sens)  # or copy what you keep: the next call overwrites it

    **The results of a call are views of these buffers, and the next call with the same
    buffers overwrites them.**  One instance holds one fit and one sensitivity result at a
    time; use one instance per result you need alive at once.  The results are the same bits
    as without buffers (the same arithmetic into memory of the same layout).  A buffer grows
    when a call needs more than it holds (the old one is let go first) and is otherwise reused
    from its start, so a smaller last group takes no new memory.
    """

    def __init__(self) -> None:
        self._held: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous ``shape`` tensor in the buffer ``name`` (new when it does not fit there).

        Its contents are whatever the last user of the buffer left: callers write every cell
        they hand out.
        """
        cells = math.prod(shape)
        held = self._held.get(name)
        if held is None or held.numel() < cells or held.dtype != dtype or not _on(held, device):
            # Let the old buffer go before allocating: both are never held by this instance.
            self._held.pop(name, None)
            held = None
            held = self._held[name] = empty((max(cells, 1),), dtype, device)
        return held[:cells].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self._held.values())

    def release(self) -> None:
        """Let every buffer go (results still referenced elsewhere keep theirs alive)."""
        self._held.clear()

    def __repr__(self) -> str:
        return f"OutputBuffers({', '.join(sorted(self._held)) or 'empty'}; {self.nbytes / 2**20:.1f} MiB)"
