"""A data stream: mixture sampler -> dataset (build + encode, redraws) -> DataLoader -> batches.

    stream = build_stream(cfg.data, "grounding", tokenizer, batch_size=6, seed=42, rank=0, world_size=8)
    batch = next(stream)            # the batch contract (collate.py)
    state = stream.state_dict()     # position in samples actually consumed (prefetch-safe)
    stream.load_state_dict(state)   # the next batch is the one that would have come next

Errors: a record that fails (missing image, bad box, ...) is handled by the bad-record policy
("error": raise; "skip-and-count": log, count, redraw from the same source). A record a builder cannot
use is redrawn (at most ``max_redraws`` times in a row). The policy's counters are per DataLoader
worker; the stream's (`DataStream.report`: distinct bad records, dialogues cut at max_length) cover every
worker, because each batch carries what was given up to make it.
"""
from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import torch

from chatterbox.data.collate import make_collate_fn
from chatterbox.data.errors import BadRecordPolicy, DataError, TooManyBadRecords
from chatterbox.data.mixtures import DrawKey, Mixture, MixtureSampler
from chatterbox.data.pipeline import EncodedSample, SampleEncoder
from chatterbox.data.sources import LoadedSource, build_options, load_source

logger = logging.getLogger("chatterbox.data")
TASKS = ("grounding", "referring", "vqa")


class MixtureDataset(torch.utils.data.Dataset):
    """Maps a `DrawKey` to an encoded sample; deterministic given the key."""

    def __init__(self, sources: dict[str, LoadedSource], encoder: SampleEncoder, options, policy: BadRecordPolicy,
                 max_redraws: int = 100):
        self.sources = sources
        self.encoder = encoder
        self.options = options
        self.policy = policy
        self.max_redraws = max_redraws
        self.num_redraws = 0

    def __len__(self) -> int:  # a mixture is an endless stream; DataLoader only needs this for map-style
        return 2**62

    def __getitem__(self, key: DrawKey) -> EncodedSample:
        source = self.sources[key.source]
        rng = random.Random(key.draw_seed)
        index = key.record_index
        skipped = []
        for attempt in range(self.max_redraws + 1):
            try:
                sample = source.build(index, rng, self.options)
                if sample is not None:
                    return dataclasses.replace(self.encoder.encode(sample), skipped_records=tuple(skipped))
            except DataError as e:
                self.policy.handle(e)
                skipped.append(f"{e.file}#{e.record}")
            self.num_redraws += 1
            index = rng.randrange(len(source.records))
        raise DataError(f"no usable sample after {self.max_redraws} redraws", key.source, key.record_index, None)


def _worker_init(worker_id: int) -> None:
    # Draws are keyed by the sampler, so workers need no shared RNG; seed the global ones per worker
    # anyway so that any incidental randomness differs across workers and is reproducible.
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)


def load_stream_sources(data_cfg, task: str, policy: BadRecordPolicy | None = None) -> tuple[Mixture, dict]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    mixture = Mixture.from_weights(getattr(data_cfg, f"{task}_mixture"))
    policy = policy or BadRecordPolicy(data_cfg.bad_record_policy, data_cfg.max_skipped_records)
    sources = {}
    for name in mixture.names:
        sources[name] = load_source(name, data_cfg, policy, task)
    return mixture, sources


class DataStream:
    """Endless iterator of collated batches for one task stream and rank; resumable."""

    def __init__(self, dataset: MixtureDataset, sampler: MixtureSampler, batch_size: int, collate_fn,
                 num_workers: int = 0, pin_memory: bool = False):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.consumed = sampler.position  # samples handed to the caller
        self._iterator = None
        # What the pipeline gave up on the way (over the whole run, resumes included): the distinct bad
        # records skipped, and the samples whose dialogue lost rounds to max_length.
        self.skipped_records: set[str] = set()
        self.truncated_samples = 0
        self.rounds_dropped = 0

    def _make_iterator(self):
        self.sampler.position = self.consumed
        # A private generator: creating a loader iterator draws a base seed, which must not consume the
        # global torch RNG (a resumed run would otherwise diverge from the uninterrupted one).
        generator = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.consumed)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=self.collate_fn,
            num_workers=self.num_workers, pin_memory=self.pin_memory, worker_init_fn=_worker_init,
            persistent_workers=False, prefetch_factor=2 if self.num_workers > 0 else None, generator=generator,
        )
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch, report = next(self._iterator)
        self.consumed += len(batch["sample_ids"])
        self._take(report)
        return batch

    def _take(self, report: dict) -> None:
        new = set(report["skipped_records"]) - self.skipped_records
        if new:
            self.skipped_records |= new
            policy = self.dataset.policy
            if len(self.skipped_records) > policy.max_skipped_records:
                raise TooManyBadRecords(f"more than max_skipped_records={policy.max_skipped_records} bad records "
                                        f"were skipped (first: {sorted(self.skipped_records)[:5]})",
                                        file=sorted(new)[0].rpartition("#")[0])
        self.truncated_samples += report["truncated_samples"]
        self.rounds_dropped += report["rounds_dropped"]

    def report(self) -> dict:
        """What this stream gave up so far: distinct bad records skipped, samples that lost rounds to
        max_length and how many rounds."""
        return {"skipped_records": len(self.skipped_records), "skipped_record_ids": sorted(self.skipped_records),
                "truncated_samples": self.truncated_samples, "rounds_dropped": self.rounds_dropped}

    def state_dict(self) -> dict:
        state = self.sampler.state_dict()
        state["position"] = self.consumed
        state["report"] = self.report()
        return state

    def load_state_dict(self, state: dict, reshard: bool = False) -> None:
        self.sampler.load_state_dict(state, reshard=reshard)
        report = state.get("report", {})
        self.skipped_records = set(report.get("skipped_record_ids", ()))
        self.truncated_samples = int(report.get("truncated_samples", 0))
        self.rounds_dropped = int(report.get("rounds_dropped", 0))
        # Restart the loader at the restored position: prefetched batches of the old one are dropped.
        self.consumed = self.sampler.position
        self._iterator = None


def build_stream(data_cfg, task: str, tokenizer, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, policy: BadRecordPolicy | None = None) -> DataStream:
    policy = policy or BadRecordPolicy(data_cfg.bad_record_policy, data_cfg.max_skipped_records)
    mixture, sources = load_stream_sources(data_cfg, task, policy)
    encoder = SampleEncoder.from_config(tokenizer, data_cfg)
    dataset = MixtureDataset(sources, encoder, build_options(data_cfg), policy, data_cfg.max_redraws)
    sampler = MixtureSampler(mixture, {n: len(s.records) for n, s in sources.items()}, seed, task, rank, world_size)
    workers = data_cfg.num_workers if num_workers is None else num_workers
    return DataStream(dataset, sampler, batch_size, make_collate_fn(tokenizer), workers)
