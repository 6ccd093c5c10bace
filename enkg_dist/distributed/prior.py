"""Prior actors: hold the diffusion prior (one GPU each where there are GPUs) and run the x_hat0 map and the
predictor for shards of the ensemble; `RemotePrior` makes them look like a local denoiser to the sampler.

The driver sends the prior with its weights on the CPU; each actor moves it to its own device (`prior.device`
resolved against the GPUs Ray gave that actor, never against the driver's hardware). Members are batched by global
index (`devices.member_chunks`), so a member's network batch, and hence its bits, do not depend on the number of
actors. With `keep_x_hat` (the Ray backend), x_hat0 stays in the object store as a `RemoteEnsemble` that simulator
workers fetch by reference: the driver sends the particles and gets back only the forward outputs.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from enkg_dist import sampler, threads
from enkg_dist.devices import actor_device, member_chunks, repeatable
from enkg_dist.distributed.ensemble import RemoteEnsemble, Shards
from enkg_dist.distributed.traffic import DRIVER, nbytes
from enkg_dist.factories import FactoryError
from enkg_dist.priors import Prior


def _get(refs):
    """ray.get, where a plug-in's error on an actor (its module missing there, its factory raising) is raised as
    itself: one line naming the factory, not the actor's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, FactoryError):
            raise FactoryError(str(e.cause)) from None
        raise


def _build(spec) -> Prior:
    """The prior, or a zero-argument factory that builds one (for priors that cannot be pickled)."""
    return spec if isinstance(spec, Prior) else spec()


class PriorWorker:
    """One copy of the prior; methods take and return numpy arrays (zero-copy through the object store)."""

    def __init__(self, spec, device: str = "auto", num_threads: int | None = None):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0) if ray.is_initialized() else 0
        threads.set_threads(num_threads or threads.for_cpus(cpus))  # the CPUs it was given (at least one thread)
        self.prior = _build(spec)
        self.device = actor_device(device, has_gpu=bool(ray.get_gpu_ids()) if ray.is_initialized() else False)
        repeatable(self.device)
        self.prior = self.prior.to(self.device)

    def thread_counts(self) -> dict:
        """The threads this actor runs (threads.in_use), asked from inside it."""
        return threads.in_use()

    def where(self) -> str:
        """The device this actor's prior runs on."""
        return str(self.device)

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x))  # the prior moves its input to its device and back

    def denoise(self, x: np.ndarray, sigma: float) -> np.ndarray:
        return self.prior.denoise(self._t(x), sigma).cpu().numpy()

    def x_hat_map(self, x: np.ndarray, sigma: float, n_ode: int, sigma_min: float, rho: float) -> np.ndarray:
        return sampler.x_hat_map(self.prior.denoise, self._t(x), sigma, n_ode, sigma_min, rho).cpu().numpy()

    def predict(self, x: np.ndarray, sigma: float, sigma_next: float, method: str) -> np.ndarray:
        return sampler.predictor(self.prior.denoise, self._t(x), sigma, sigma_next, method).cpu().numpy()

    @ray.method(num_returns=2)
    def x_hat_map_kept(self, x: np.ndarray, sigma: float, n_ode: int, sigma_min: float, rho: float):
        """x_hat_map as two objects, its shape and the array: the driver fetches the shape only (waiting for the map
        and seeing its errors), the array stays in the object store for the simulator workers."""
        out = self.x_hat_map(x, sigma, n_ode, sigma_min, rho)
        return out.shape, out


RemotePriorWorker = ray.remote(PriorWorker)


class RemotePrior(sampler.DenoiserMaps):
    """A denoiser whose work is split over prior actors in shards of whole global batches (member order kept); as a
    sampler.DenoiserMaps it runs a step's x_hat0 map and predictor on the actors, where the model lives."""

    def __init__(self, spec: Prior, num_actors: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
                 device: str = "auto", keep_x_hat: bool = False, threads: int | None = None):
        super().__init__(self.__call__)
        # x_hat0 stays in the object store (a RemoteEnsemble) for simulator workers that fetch it by reference
        # (distributed.pool.WorkerPool); otherwise it comes back as a tensor
        self.keep_x_hat = keep_x_hat
        self.max_batch = spec.max_batch if isinstance(spec, Prior) else None  # a factory: one batch
        self._spec = ray.put(spec)  # kept referenced: a restarted actor (after a node loss) is built from it again
        self.actors = [RemotePriorWorker.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=3,
                                                 max_task_retries=3).remote(self._spec, device, threads)
                       for _ in range(num_actors)]

    def _shards(self, J: int) -> list[tuple[object, int, int]]:
        """(actor, start, stop) of each non-empty shard of J members: whole global batches, in member order."""
        return [(a, c[0][0], c[-1][1]) for a, c in zip(self.actors, member_chunks(J, self.max_batch, len(self.actors)))
                if c]

    def _map(self, method: str, x: torch.Tensor, *args) -> torch.Tensor:
        xn = x.detach().cpu().numpy()
        shards = self._shards(xn.shape[0])
        refs = [getattr(a, method).remote(xn[s:e], *args) for a, s, e in shards]
        out = _get(refs)
        DRIVER.sent += nbytes(*(xn[s:e] for _, s, e in shards))
        DRIVER.received += nbytes(*out)
        return torch.from_numpy(np.concatenate(out)).to(x.device)

    def _map_kept(self, xn: np.ndarray, *args) -> Shards:
        """x_hat_map on the actors, its shards left in the object store."""
        shards = self._shards(xn.shape[0])
        pairs = [a.x_hat_map_kept.remote(xn[s:e], *args) for a, s, e in shards]
        _get([shape for shape, _ in pairs])  # waits for the maps and raises their errors, fetching no array
        DRIVER.sent += nbytes(*(xn[s:e] for _, s, e in shards))
        return [(arr, s, e) for (_, arr), (_, s, e) in zip(pairs, shards)]

    def threads(self, timeout: float = 10.0) -> list[dict]:
        """The threads each actor runs (actors that do not answer within `timeout` seconds left out)."""
        from enkg_dist.distributed.pool import answered

        return answered([a.thread_counts.remote() for a in self.actors], timeout)

    def devices(self) -> list[str]:
        """Where each actor's prior runs."""
        return ray.get([a.where.remote() for a in self.actors])

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self._map("denoise", x, float(sigma))

    def x_hat_map(self, x, sigma, n_ode, sigma_min, rho):
        args = (float(sigma), int(n_ode), float(sigma_min), float(rho))
        if not self.keep_x_hat:
            return self._map("x_hat_map", x, *args)
        xn = x.detach().cpu().numpy()
        return RemoteEnsemble(self._map_kept(xn, *args), xn.shape, xn.dtype, lambda: self._map_kept(xn, *args))

    def predict(self, x, sigma, sigma_next, method):
        return self._map("predict", x, float(sigma), float(sigma_next), method)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
