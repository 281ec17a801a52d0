"""Policy evaluations as tasks on a Dask distributed cluster.

A search's cost is its accuracy measurements (a QAT recalibration and finetune each);
everything else a strategy does is cheap. ``EvaluationPool`` runs several measurements
at once as Dask tasks: ``--workers N`` starts a ``LocalCluster`` of ``N`` single-threaded
worker processes on this machine, ``--cluster ADDRESS`` joins a running scheduler through
Dask's own ``Client`` (started by ``dask scheduler`` / ``dask worker``, dask-jobqueue on
Slurm, or the Dask Kubernetes operator).

The evaluation (base model, dataset, finetune recipe) reaches the workers once, as the
result of a task that unpickles it; tasks of a worker that dies are rerun elsewhere by
the scheduler (its ``allowed-failures`` bound), and a lost copy of the evaluation is
recomputed from its task. A measurement is deterministic and runs on one thread, as the
in-process search does, so its value does not depend on where it runs.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import Bits

#: Seconds to wait for a cluster's scheduler and its first worker.
CONNECT_TIMEOUT_S = 60


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
        from distributed import Client, LocalCluster

        if workers is not None and workers < 1:
            raise CimError(f"--workers must be at least 1, got {workers}")
        if address is None:
            cluster = LocalCluster(
                n_workers=workers or 1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
            )
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
        payload = pickle.dumps(evaluation)
        key = f"evaluation-{hashlib.blake2b(payload, digest_size=8).hexdigest()}"
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
        futures = [
            self.client.submit(
                _measured,
                self._evaluation,
                {name: (b.w_bits, b.a_bits) for name, b in precision.items()},
                pure=False,
            )
            for precision in precisions
        ]
        try:
            return [float(value) for value in self.client.gather(futures)]
        except KilledWorker as exc:
            raise CimError(
                f"an accuracy measurement killed every worker it ran on: {exc}"
            ) from None
