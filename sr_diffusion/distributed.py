"""The processes of one command run: this process alone, or the processes of ``accelerate launch``.

``accelerate launch --num_processes N -m sr_diffusion.cli upscale IN/ -o OUT/`` runs the command once per process.
:class:`Processes` is what the command sees of that: which process it is, the device accelerate gave it, its share of
a list (accelerate's ``split_between_processes``), and the collectives it needs (accelerate's ``gather_object`` and
``broadcast_object_list``). Run without a launcher (or launched with one process) it is this process alone, and
accelerate's state is never created: nothing about the device choice or the process changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Processes", "ProcessesFailed", "launched_processes"]

T = TypeVar("T")


#: Where launchers put the number of processes: torchrun (and ``accelerate launch --multi_gpu``, which runs it), then
#: the MPI launchers of ``accelerate launch --cpu --mpirun_hostfile`` (Intel MPI / MPICH, Open MPI, MVAPICH)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started (the first of :data:`WORLD_SIZE_VARIABLES` that is set); 1 without a
    launcher."""
    for name in WORLD_SIZE_VARIABLES:
        try:
            value = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if value >= 1:
            return value
    return 1


def _accelerator_available(torch) -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


class ProcessesFailed(Exception):
    """Raised on every process when a step failed on any of them: ``message`` (one line, the failing processes' errors)
    and ``code`` (the exit status every process returns)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.message = message
        self.code = code


class Processes:
    """This process alone, or, when a launcher started several, all of them through accelerate's ``PartialState``.

    Alone, every method is the identity (:meth:`agree` just calls its function) and :attr:`device` is ``None`` (the
    command chooses as it always does).
    """

    def __init__(self):
        self.state = None
        launched = launched_processes()
        if launched > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # joins the process group: nccl on GPUs; gloo with ACCELERATE_USE_CPU (``accelerate launch --cpu``) or on
            # a machine without an accelerator, where accelerate would otherwise take each process for a run of its
            # own (``accelerate launch --multi_gpu`` or torchrun there)
            cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not _accelerator_available(torch)
            self.state = PartialState(cpu=cpu)
            if self.state.num_processes != launched:
                raise RuntimeError(
                    f"the launcher started {launched} processes, but accelerate's state has "
                    f"{self.state.num_processes} ({self.state.distributed_type})"
                )

    @property
    def distributed(self) -> bool:
        return self.state is not None and self.state.num_processes > 1

    @property
    def num_processes(self) -> int:
        return self.state.num_processes if self.state is not None else 1

    @property
    def process_index(self) -> int:
        return self.state.process_index if self.state is not None else 0

    @property
    def is_main_process(self) -> bool:
        return self.state is None or self.state.is_main_process

    @property
    def device(self) -> str | None:
        """The device accelerate gives this process (``cuda:<local rank>``; ``cpu`` with ``--cpu``); alone ``None``."""
        return str(self.state.device) if self.state is not None else None

    def split(self, items: list[T]) -> list[T]:
        """This process's share of ``items`` (the same list on every process): contiguous, in order, sizes differing
        by at most one (``PartialState.split_between_processes``, no padding)."""
        if not self.distributed:
            return list(items)
        with self.state.split_between_processes(list(items)) as share:
            return list(share)

    def gather(self, obj: Any) -> list:
        """``obj`` of every process, by process index, on every process (``gather_object``)."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (``broadcast_object_list``)."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def agree(self, step: Callable[[], T], describe: Callable[[BaseException], tuple[str, int]]) -> T:
        """``step()`` on every process. Alone, its exceptions propagate unchanged. Launched, a failure on any process
        raises :class:`ProcessesFailed` on all of them (so none waits forever for the others in a later collective):
        its message is the failing processes' errors (``describe(err)``: a line and an exit status), once when they
        agree, else each prefixed by its process, and its code is the largest exit status."""
        if not self.distributed:
            return step()
        try:
            result, report = step(), None
        except Exception as err:  # reported by the main process, below
            result, report = None, describe(err)
        reports = self.gather(report)
        failed = [(index, r) for index, r in enumerate(reports) if r is not None]
        if not failed:
            return result
        messages = list(dict.fromkeys(message for _, (message, _) in failed))
        if len(messages) == 1:
            message = messages[0]
        else:
            message = "; ".join(f"process {index}: {message}" for index, (message, _) in failed)
        raise ProcessesFailed(message, max(code for _, (_, code) in failed))
