"""Weighted mixtures of sources, a resumable distributed sampler, and the stage-2 stream cadence.

Draw ``g`` (a global counter over all ranks) is a pure function of ``(seed, stream, g)``: which source
(probability = weight / sum of weights), which record (uniform, as upstream draws a random record) and
a 63-bit seed for the builder's random choices. Rank ``r`` of ``w`` takes draws ``r, r + w, r + 2w, ...``
so ranks never share a draw; DataLoader workers only build what the sampler hands them, so the sequence
does not depend on the number of workers. Resuming = restarting at a saved position.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

#: Upstream's stage-2 cadence (spec §2.5): referring every 10 global steps, grounding every step,
#: VQA every 5, in this order within a step.
STAGE2_CADENCE = {"referring": 10, "grounding": 1, "vqa": 5}
STAGE1_CADENCE = {"grounding": 1}
STREAM_ORDER = ("referring", "grounding", "vqa")


def streams_due(global_step: int, cadence: dict[str, int], order=STREAM_ORDER) -> list[str]:
    """Streams that run at ``global_step`` (those with ``global_step % every == 0``), in upstream's order."""
    for name, every in cadence.items():
        if every < 1:
            raise ValueError(f"stream {name!r}: every_n_steps must be >= 1, got {every}")
    ordered = [s for s in order if s in cadence] + [s for s in cadence if s not in order]
    return [s for s in ordered if global_step % cadence[s] == 0]


class DrawKey(NamedTuple):
    source: str
    record_index: int
    draw_seed: int
    draw_index: int  # global draw counter


def _stream_key(stream: str) -> int:
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Mixture:
    """Normalised weights over the sources with weight > 0, in a fixed (sorted) order."""

    names: tuple[str, ...]
    probabilities: tuple[float, ...]

    @classmethod
    def from_weights(cls, weights: dict[str, float]) -> "Mixture":
        bad = {k: v for k, v in weights.items() if not (v >= 0)}
        if bad:
            raise ValueError(f"mixture weights must be >= 0, got {bad}")
        used = sorted(k for k, v in weights.items() if v > 0)
        if not used:
            raise ValueError(f"mixture {weights} has no source with a positive weight")
        total = float(sum(weights[k] for k in used))
        return cls(tuple(used), tuple(weights[k] / total for k in used))


class MixtureSampler(torch.utils.data.Sampler):
    """Infinite, deterministic, resumable stream of `DrawKey`s for one rank."""

    def __init__(self, mixture: Mixture, source_sizes: dict[str, int], seed: int, stream: str = "grounding",
                 rank: int = 0, world_size: int = 1, position: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        missing = [n for n in mixture.names if source_sizes.get(n, 0) <= 0]
        if missing:
            raise ValueError(f"sources without records: {missing}")
        self.mixture = mixture
        self.sizes = dict(source_sizes)
        self.seed = int(seed)
        self.stream = stream
        self.rank = rank
        self.world_size = world_size
        self.position = position  # draws this rank has handed out
        # Global draws made before this run's layout began (non-zero after resuming on another world size).
        self.base_draw = 0
        self._cumulative = np.cumsum(mixture.probabilities)
        self._stream_key = _stream_key(stream)

    def key_at(self, local_position: int) -> DrawKey:
        draw_index = self.base_draw + local_position * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, self._stream_key, draw_index])
        u = rng.random()
        source = self.mixture.names[min(int(np.searchsorted(self._cumulative, u, side="right")),
                                        len(self.mixture.names) - 1)]
        record_index = int(rng.integers(self.sizes[source]))
        draw_seed = int(rng.integers(2**63 - 1))
        return DrawKey(source, record_index, draw_seed, draw_index)

    def __iter__(self) -> Iterator[DrawKey]:
        while True:
            key = self.key_at(self.position)
            self.position += 1
            yield key

    def state_dict(self) -> dict:
        return {"position": self.position, "base_draw": self.base_draw, "seed": self.seed, "stream": self.stream,
                "rank": self.rank, "world_size": self.world_size, "sources": list(self.mixture.names)}

    def load_state_dict(self, state: dict, reshard: bool = False) -> None:
        """Restore a position. ``reshard=True`` accepts a state saved with another world size: the run
        then continues after every draw the old ranks made (all ranks advance in lockstep, so the state
        of any one old rank tells how many that was)."""
        for key in ("seed", "stream") + (() if reshard else ("world_size",)):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                                 f"{getattr(self, key)!r}")
        if list(state["sources"]) != list(self.mixture.names):
            raise ValueError(f"sampler state was saved for sources {state['sources']}, this mixture has "
                             f"{list(self.mixture.names)}")
        base = int(state.get("base_draw", 0))
        if reshard and state["world_size"] != self.world_size:
            self.base_draw = base + int(state["position"]) * int(state["world_size"])
            self.position = 0
        else:
            self.base_draw = base
            self.position = int(state["position"])
