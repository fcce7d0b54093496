"""Which domain each step trains on, and which images of it.

Every batch holds images of ONE domain. A :class:`DomainSampler` picks the domain per step
(``dynamic`` = UDON, ``round_robin``, ``uniform``, ``size``); an :class:`InfiniteIndexSampler`
per domain hands out image positions, reshuffling at every pass. All state is small and
JSON-able so that ``--resume`` continues exactly, and every rank of a DDP run holds the same state
(same seed, same all-reduced losses) so that all ranks draw the same domain.

:data:`SAMPLERS` is the registry (name -> class); the CLI's ``--sampler`` choices read it. A sampler
reports a change of its probabilities as the return value of :meth:`DomainSampler.record`.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ..errors import UniretError


class InfiniteIndexSampler:
    """Endless positions ``0..n-1`` of one domain: a fresh permutation every pass."""

    def __init__(self, n: int, seed: int, key: int):
        if n < 1:
            raise UniretError("a training domain has no images; remove it or add a train split")
        self.n, self.seed, self.key = n, seed, key
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.key, self.epoch]).permutation(self.n)

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            k = min(count - len(out), self.n - self.pos)
            out.extend(int(i) for i in self._perm[self.pos : self.pos + k])
            self.pos += k
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


class DomainSampler:
    """Chooses the domain of each step. Subclasses set ``probabilities`` and ``_draw``."""

    name = "base"
    help = ""

    def __init__(self, sizes: list[int], seed: int):
        self.sizes = list(sizes)
        self.num_domains = len(sizes)
        self.rng = np.random.default_rng([seed, 7919])
        self.step = 0  # number of domains handed out so far

    @classmethod
    def create(cls, sizes: list[int], seed: int, interval: int, window: int) -> DomainSampler:
        """Build from the run's options (only the dynamic sampler uses ``interval`` and ``window``)."""
        return cls(sizes, seed)

    def probabilities(self) -> list[float]:
        raise NotImplementedError

    def _draw(self) -> int:
        raise NotImplementedError

    def next_domain(self) -> int:
        d = self._draw()
        self.step += 1
        return d

    def record(self, domain: int, loss: float) -> dict | None:
        """Record the loss the sampler follows for the step just handed out. Returns an update event
        (``step`` = the first step drawn from the new probabilities, ``probabilities``, and what they
        were computed from) when the probabilities change, else None. Fixed samplers ignore losses."""
        return None

    def state_dict(self) -> dict:
        return {"step": self.step, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]


class RoundRobinSampler(DomainSampler):
    name = "round_robin"
    help = "domains in turn"

    def probabilities(self) -> list[float]:
        return [1.0 / self.num_domains] * self.num_domains

    def _draw(self) -> int:
        return self.step % self.num_domains


class UniformSampler(DomainSampler):
    name = "uniform"
    help = "a domain drawn uniformly at random"

    def probabilities(self) -> list[float]:
        return [1.0 / self.num_domains] * self.num_domains

    def _draw(self) -> int:
        return int(self.rng.choice(self.num_domains, p=self.probabilities()))


class SizeSampler(DomainSampler):
    """Proportional to the number of training images (the papers' "DS" baseline)."""

    name = "size"
    help = "a domain drawn proportionally to its training images"

    def probabilities(self) -> list[float]:
        total = float(sum(self.sizes))
        return [s / total for s in self.sizes]

    def _draw(self) -> int:
        return int(self.rng.choice(self.num_domains, p=self.probabilities()))


class DynamicSampler(DomainSampler):
    """UDON's dynamic sampling: round-robin for the first ``interval`` steps; then, every
    ``interval`` steps, ``p_i = Lbar_i / sum_j Lbar_j`` where ``Lbar_i`` is the mean recorded
    (teacher classification) loss of domain i over the last ``window`` steps; one domain is drawn
    i.i.d. from p per step. A domain without a step in the window keeps its last mean."""

    name = "dynamic"
    help = "UDON: p proportional to each domain's recent loss, updated every dynamic_interval steps"

    def __init__(self, sizes: list[int], seed: int, interval: int = 1000, window: int = 1000):
        super().__init__(sizes, seed)
        self.interval, self.window = interval, window
        self.history: deque[tuple[int, int, float]] = deque()  # (step, domain, loss)
        self.last_mean: list[float | None] = [None] * self.num_domains
        self.probs: list[float] | None = None  # None while still round-robin

    @classmethod
    def create(cls, sizes: list[int], seed: int, interval: int, window: int) -> DynamicSampler:
        return cls(sizes, seed, interval=interval, window=window)

    def probabilities(self) -> list[float]:
        return list(self.probs) if self.probs is not None else [1.0 / self.num_domains] * self.num_domains

    def record(self, domain: int, loss: float) -> dict | None:
        # Recorded for the step that was just handed out (self.step - 1).
        self.history.append((self.step - 1, int(domain), float(loss)))
        while self.history and self.history[0][0] < self.step - self.window:
            self.history.popleft()
        # p changes between the last step of an interval and the first of the next one.
        return self._update() if self.step % self.interval == 0 else None

    def window_means(self) -> list[float | None]:
        sums = [0.0] * self.num_domains
        counts = [0] * self.num_domains
        for _, d, loss in self.history:
            sums[d] += loss
            counts[d] += 1
        return [sums[d] / counts[d] if counts[d] else self.last_mean[d] for d in range(self.num_domains)]

    def _update(self) -> dict | None:
        means = self.window_means()
        self.last_mean = means
        if any(m is None for m in means):
            return None  # a domain was never seen (interval < number of domains): stay round-robin
        total = sum(means)
        self.probs = [m / total for m in means] if total > 0 else [1.0 / self.num_domains] * self.num_domains
        return {"step": self.step, "window_means": means, "probabilities": list(self.probs)}

    def _draw(self) -> int:
        if self.probs is None:
            return self.step % self.num_domains
        return int(self.rng.choice(self.num_domains, p=self.probs))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(history=[list(h) for h in self.history], last_mean=self.last_mean, probs=self.probs)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = deque((int(s), int(d), float(v)) for s, d, v in state["history"])
        self.last_mean = list(state["last_mean"])
        self.probs = None if state["probs"] is None else list(state["probs"])


#: Every domain sampler by name (the CLI's ``--sampler`` choices).
SAMPLERS: dict[str, type[DomainSampler]] = {
    cls.name: cls for cls in (DynamicSampler, RoundRobinSampler, UniformSampler, SizeSampler)
}


def make_domain_sampler(name: str, sizes: list[int], seed: int, interval: int = 1000, window: int = 1000) -> DomainSampler:
    if name not in SAMPLERS:
        raise UniretError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name].create(sizes, seed, interval=interval, window=window)
