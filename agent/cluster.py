"""Policy evaluations as tasks on a Dask distributed cluster.

A search's cost is its accuracy measurements (a QAT recalibration and finetune each);
everything else a strategy does is cheap. ``EvaluationPool`` runs several measurements
at once as Dask tasks: ``--workers N`` starts a ``LocalCluster`` of ``N`` single-threaded
worker processes on this machine, ``--cluster ADDRESS`` joins a running scheduler through
Dask's own ``Client`` (started by ``dask scheduler`` / ``dask worker``, dask-jobqueue on
Slurm, or the Dask Kubernetes operator).

The evaluation (base model, dataset, finetune recipe) reaches the workers once, as the
result of a task that unpickles it, and every worker imports what a measurement needs as
it starts (a worker plugin). The measurements of a batch are dealt to the workers in
turn; tasks of a worker that dies are rerun elsewhere by the scheduler (its
``allowed-failures`` bound), and a lost copy of the evaluation is recomputed from its
task. A measurement is deterministic and runs on one thread, as the
in-process search does, so its value does not depend on where it runs.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Mapping, Sequence

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import Bits

#: Seconds to wait for a cluster's scheduler and its first worker.
CONNECT_TIMEOUT_S = 60

#: Dask's nannies set glibc's MALLOC_TRIM_THRESHOLD_ low to hand memory back to the OS;
#: that also turns off glibc's adaptive mmap threshold, so every tensor of a finetune
#: batch is a fresh mmap and its page faults (measured: a digits measurement 1.4x
#: slower). The local workers keep glibc's defaults, as the in-process search does.
LOCAL_WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(workers: int):
    """A Dask ``LocalCluster`` of ``workers`` single-threaded processes on this machine."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(LOCAL_WORKER_CONFIG):
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )


def _worker_plugin():
    """A Dask worker plugin that imports, on every worker as it starts, what a first
    measurement would otherwise import inside its task: torch's first optimizer imports
    ``torch._dynamo`` (seconds), which in a batch holds up every other measurement."""
    from distributed import WorkerPlugin

    class ImportMeasurement(WorkerPlugin):
        name = "tvm-cim-import-measurement"

        def setup(self, worker):
            import torch._dynamo  # noqa: F401

            import tvm_cim.learn.train  # noqa: F401

    return ImportMeasurement()


def _unpickled(payload: bytes):
    """Worker side: the evaluation a search sent."""
    return pickle.loads(payload)


def _measured(evaluation, precision: dict) -> float:
    """Worker side: one accuracy measurement, on one thread as the in-process search."""
    import torch

    torch.set_num_threads(1)
    return float(evaluation({name: Bits(*bits) for name, bits in precision.items()}))


class EvaluationPool:
    """Accuracy measurements of one evaluation, several at a time, on a Dask cluster.

    Use ``EvaluationPool.open`` as a context manager; ``workers`` is how many measurements
    a strategy keeps in flight (the batch size, recorded in the search's log).
    """

    def __init__(self, client, workers: int, cluster=None):
        self.client = client
        self.workers = workers
        self._cluster = cluster  # the local cluster this pool started, if any
        self._evaluation = None

    @classmethod
    def open(cls, workers: int | None = None, address: str | None = None) -> EvaluationPool:
        """A local cluster of ``workers`` processes, or the cluster at ``address`` (where
        ``workers`` defaults to the workers it has now).

        Raises
        ------
        CimError
            ``workers`` below 1, or a scheduler that does not answer.
        """
        from distributed import Client

        if workers is not None and workers < 1:
            raise CimError(f"--workers must be at least 1, got {workers}")
        if address is None:
            cluster = local_cluster(workers or 1)
            return cls(Client(cluster), workers or 1, cluster)
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S)
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise CimError(f"cannot join the Dask cluster at {address}: {exc}") from None
        return cls(client, workers or len(client.scheduler_info()["workers"]))

    def __enter__(self) -> EvaluationPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def bind(self, evaluation) -> None:
        """Send ``evaluation`` (called with ``{operator name: Bits}``) to the cluster."""
        self.client.register_plugin(_worker_plugin())
        payload = pickle.dumps(evaluation)
        key = f"evaluation-{hashlib.blake2b(payload, digest_size=8).hexdigest()}"
        with warnings.catch_warnings():
            # sent once, in a task so that a lost copy is recomputed: no repeated graph
            warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
            self._evaluation = self.client.submit(_unpickled, payload, key=key, pure=False)

    def measure(self, precisions: Sequence[Mapping[str, Bits]]) -> list[float]:
        """The accuracy of each precision, measured in parallel, in order.

        Raises
        ------
        CimError
            A measurement failed (its error), or its task died on every worker it was
            given to.
        """
        from distributed import KilledWorker

        if self._evaluation is None:
            raise CimError("EvaluationPool.measure before bind")
        # The measurements dealt to the workers in turn: left to itself the scheduler at
        # times gave both measurements of a batch to one of two workers for many batches
        # running, the other idle. A worker that is gone does not hold its task back.
        workers = sorted(self.client.scheduler_info()["workers"])
        futures = [
            self.client.submit(
                _measured,
                self._evaluation,
                {name: (b.w_bits, b.a_bits) for name, b in precision.items()},
                pure=False,
                workers=[workers[index % len(workers)]] if workers else None,
                allow_other_workers=True,
            )
            for index, precision in enumerate(precisions)
        ]
        try:
            return [float(value) for value in self.client.gather(futures)]
        except KilledWorker as exc:
            raise CimError(
                f"an accuracy measurement killed every worker it ran on: {exc}"
            ) from None
