"""Batches of (uint8 images, dataset indices) for training and evaluation.

Small-image datasets live as one uint8 tensor on the training device (CIFAR-10 is 150 MB): a
batch is an index_select, the shuffle is a seeded permutation, and augmentation runs batched on
the same device (augment.py). No DataLoader workers, no per-image Python. Large-image sources
(`FileImageSet`) stream through DataLoader workers. For training, a worker draws each view's
crop box on the whole stored image (torchvision's ``RandomResizedCrop`` distribution,
`instdisc.augment.crop_boxes`), decodes only as much of the file as the boxes need (JPEG DCT
scaling) and resizes each box, antialiased, to its view's size: the batch is then one uint8
tensor per view, and flip, colour jitter, grayscale and blur run batched on the device as for
small images (``augment(..., cropped=True)``). PIC's one large and several small crops are all
drawn from the whole image. Evaluation batches are the resize-256 + centre-crop-224 view, scaled
to the configured size (`instdisc.sources.images.FileImageSet.read_eval`).

Randomness is a pure function of (seed, epoch) for the data order, and of (seed, step, rank) for
the crops (`crop_generator`): both can be regenerated exactly, which is what makes mid-epoch
resume exact without pickling iterator state.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instdisc.augment import CROP_UNIFORMS, AugmentConfig, crop_boxes
from instdisc.errors import ConfigError
from instdisc.sources import ArrayImageSet, FileImageSet, ImageSet

# order(epoch) -> (L,) int64 indices to visit in that epoch (a permutation by default).
Order = Callable[[int], Tensor]

# What a worker needs of one view to crop it at decode time: (size, scale, ratio).
CropSpec = tuple[int, tuple[float, float], tuple[float, float]]


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of every random draw of training step ``step`` on rank ``rank`` (data order aside)."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def crop_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """CPU generator of the decode-time crop boxes of (seed, step, rank).

    Its own stream: seeded from `step_seed` through a fixed odd multiplier and offset, so the crop
    uniforms are never the very draws the step's device-side augmentation generator (seeded with
    `step_seed` itself) turns into flips and jitter.
    """
    s = (step_seed(seed, step, rank) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63)
    return torch.Generator().manual_seed(s)


def crop_specs(views: Sequence[AugmentConfig]) -> list[CropSpec]:
    """The crop part of each view's recipe, for the workers."""
    return [(int(v.size), tuple(v.scale), tuple(v.ratio)) for v in views]  # type: ignore[misc]


def decode_crops(
    images: FileImageSet, idx: Tensor, views: Sequence[CropSpec], generator: torch.Generator
) -> list[Tensor]:
    """One batch's views, cropped at decode time: per view a (B, S, S, 3) uint8 tensor.

    The generator gives ``(V, B, CROP_UNIFORMS)`` float64 uniforms in one draw (row b of view v is
    image b's crop in that view), so the boxes depend on (generator state, image sizes) alone.
    """
    ids = [int(j) for j in idx]
    u = torch.rand(len(views), len(ids), CROP_UNIFORMS, generator=generator, dtype=torch.float64)
    data = [images.read_bytes(j) for j in ids]
    wh = torch.tensor([images.size_of(j, d) for j, d in zip(ids, data, strict=True)], dtype=torch.float64)  # (B, 2)
    boxes = [crop_boxes(u[v], wh[:, 1], wh[:, 0], scale, ratio).tolist()  # V x B x (top, left, h, w)
             for v, (_, scale, ratio) in enumerate(views)]
    sizes = [size for size, _, _ in views]
    out = [np.empty((len(ids), s, s, 3), dtype=np.uint8) for s in sizes]
    for b, (j, d) in enumerate(zip(ids, data, strict=True)):
        for v, crop in enumerate(images.read_crops(j, d, [bx[b] for bx in boxes], sizes)):
            out[v][b] = crop
    return [torch.from_numpy(o) for o in out]


def random_order(num_samples: int, seed: int) -> Order:
    """A fresh random permutation per epoch, identical on every rank (seeded by seed and epoch)."""

    def order(epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return torch.randperm(num_samples, generator=g)

    return order


def sliding_window_order(
    num_samples: int, seed: int, *, window: int, stride: int, epoch_len: int | None = None
) -> Order:
    """PIC's sliding-window data scheduler (Cao et al., NeurIPS 2020, Sec. 3.3) as an `Order`.

    A fixed random arrangement of the N images is read through a window of D consecutive positions
    that slides by S: window w covers positions ``(w*S + arange(D)) mod N`` and visits them in its
    own random order. Consecutive windows share D - S positions, so most images come back after
    about D images instead of N (an image sits in D/S consecutive windows, then waits about N/S
    windows for the window to come round again). The modulus is over all N positions: the
    reference sampler takes it modulo the window size, so without reshuffling it never leaves the
    first window.

    The windows, laid end to end, form one stream; epoch e is its slice ``[e*L, (e+1)*L)`` with L =
    `epoch_len` (default N). An epoch therefore still means N images: --epochs, --warmup-epochs,
    --milestones and the lr schedule keep their meaning, and the number of images seen equals the
    requested epochs times N (the reference instead rescales its epoch count to ceil(E*N/D) windows;
    same total). A window may straddle two epochs. Under torchrun the stream is global and every
    global batch is split across ranks, so each rank reads a D/world share of each window and a run
    sees the same batches whatever the number of processes.

    Everything is a function of (seed, window number): resuming at (epoch, step) is exact.

    Args:
        num_samples: N.
        seed: run seed (the arrangement and every window's order derive from it).
        window: D, 1 <= D <= N (paper: 131,072 on ImageNet, about N/10).
        stride: S, 1 <= S <= D (paper: 16,384 = D/8). S > D would skip positions for good.
        epoch_len: stream entries per epoch; pass steps * batch so no entry is dropped.
    """
    n, d, s = num_samples, window, stride
    if not 1 <= d <= n:
        raise ConfigError(f"--window must be between 1 and the number of training images ({n}); got {d}.")
    if not 1 <= s <= d:
        raise ConfigError(f"--stride must be between 1 and --window ({d}), or images would be skipped; got {s}.")
    length = n if epoch_len is None else epoch_len
    base = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + 7))  # (N,) arrangement

    def window_ids(w: int) -> Tensor:
        pos = (w * s + torch.arange(d)) % n  # (D,) positions of window w, wrapping over all N
        g = torch.Generator().manual_seed((seed * 1_000_003 + w) * 31 + 1)
        return base[pos[torch.randperm(d, generator=g)]]  # (D,) image ids, shuffled within the window

    def order(epoch: int) -> Tensor:
        start = epoch * length  # stream offset of this epoch
        first, last = start // d, (start + length - 1) // d
        stream = torch.cat([window_ids(w) for w in range(first, last + 1)])
        return stream[start - first * d : start - first * d + length]  # (L,)

    return order


def make_order(sampler: str, num_samples: int, *, seed: int, window: int = 0, stride: int = 0,
               batch_size: int = 1) -> Order:
    """The `Order` named by --sampler: "shuffle" (a permutation per epoch) or "sliding" (PIC's).

    For "sliding", window 0 means N // 10 (the paper's D/N on ImageNet) and stride 0 means D // 8
    (the paper's D/S).
    """
    if sampler == "shuffle":
        return random_order(num_samples, seed)
    if sampler == "sliding":
        d = window or max(num_samples // 10, 1)
        s = stride or max(d // 8, 1)
        steps = num_samples // batch_size
        return sliding_window_order(num_samples, seed, window=d, stride=s, epoch_len=steps * batch_size or num_samples)
    raise ConfigError(f"unknown --sampler {sampler!r}; choose shuffle or sliding.")


def images_to_tensor(images: ImageSet, device: torch.device | str = "cpu") -> Tensor:
    """(N, H, W, 3) uint8 tensor of an in-memory image set, on `device`."""
    if not isinstance(images, ArrayImageSet):
        raise TypeError("only ArrayImageSet sources can be held in memory")
    return torch.from_numpy(np.ascontiguousarray(images.images)).to(device)


class _FileBatches(torch.utils.data.Dataset):
    """Decodes whole batches in a worker: item i of this dataset is batch i of `batches`.

    With ``eval_size``, a `FileImageSet` gives its evaluation view at that size (`read_eval`).
    """

    def __init__(self, images: ImageSet, batches: list[Tensor], eval_size: int | None = None) -> None:
        self.images, self.batches, self.eval_size = images, batches, eval_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Tensor:
        im, size = self.images, self.eval_size
        if size is not None and isinstance(im, FileImageSet) and im.whole_images:
            return torch.from_numpy(np.stack([im.read_eval(int(j), size) for j in self.batches[i]]))
        return torch.from_numpy(np.stack([im.read(int(j)) for j in self.batches[i]]))


class _CropBatches(torch.utils.data.Dataset):
    """Item k is batch k of `batches`, cropped at decode time for global step ``first_step + k``."""

    def __init__(self, images: FileImageSet, batches: list[Tensor], views: list[CropSpec], *, seed: int,
                 rank: int, first_step: int) -> None:
        self.images, self.batches, self.views = images, batches, views
        self.seed, self.rank, self.first_step = seed, rank, first_step

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> list[Tensor]:
        g = crop_generator(self.seed, self.first_step + k, self.rank)
        return decode_crops(self.images, self.batches[k], self.views, g)


class TrainLoader:
    """Per-rank training batches: step s of epoch e takes rows [s*B, (s+1)*B) of order(e),
    and rank r keeps its slice of those B (B = global batch). The last partial batch is dropped so
    that every rank runs the same number of equal-sized steps (collectives need that).

    Args:
        images: the training set.
        batch_size: global batch size B (must divide by world_size).
        device: where batches (and, for in-memory sets, the whole dataset) live.
        order: data order per epoch; default a seeded permutation.
        workers: DataLoader workers for streamed sources.
        in_memory: False streams even an in-memory set through DataLoader workers (per-image reads
            on the host, then a copy to `device`): the same batches, by the slower path, to compare.
        views: the augmentation of each view the loop will make. Given for a `FileImageSet` of
            `whole_images`, the workers crop every view at decode time and `epoch` yields a list
            of per-view ``(b, 3, S, S)`` uint8 batches instead of one batch of whole images.

    The order is drawn on the CPU (a CPU generator, so it is the same on every device and every
    rank and regenerable for resume) and, on the in-memory path, copied to the device once per
    epoch as one (L,) int64 tensor; each step then slices it there, with no host round trip.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        order: Order | None = None,
        workers: int = 4,
        in_memory: bool = True,
        views: Sequence[AugmentConfig] | None = None,
    ) -> None:
        n = len(images)
        if batch_size % world_size:
            raise ConfigError(f"--batch-size {batch_size} must be divisible by the number of processes ({world_size}).")
        if batch_size > n:
            raise ConfigError(
                f"--batch-size {batch_size} is larger than the training set ({n} images); use at most {n}."
            )
        self.images, self.batch_size, self.rank, self.world = images, batch_size, rank, world_size
        self.local_batch = batch_size // world_size
        self.seed = seed
        self.device = torch.device(device)
        self.order = order or random_order(n, seed)
        self.workers = workers
        held = in_memory and isinstance(images, ArrayImageSet)
        self.data = images_to_tensor(images, self.device) if held else None  # (N, H, W, 3) uint8
        whole = isinstance(images, FileImageSet) and images.whole_images
        self.crops = crop_specs(views) if views is not None and whole else None

    @property
    def crops_at_decode(self) -> bool:
        """True when `epoch` yields per-view crops made by the workers (large images)."""
        return self.crops is not None

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return len(self.order(epoch)) // self.batch_size

    def epoch(
        self, epoch: int, start_step: int = 0, first_step: int | None = None
    ) -> Iterator[tuple[Tensor | list[Tensor], Tensor]]:
        """Yield (x, idx): x (b, 3, H, W) uint8 on device, idx (b,) int64 dataset indices.

        When `crops_at_decode`, x is a list with one (b, 3, S_v, S_v) uint8 batch per view, and
        ``first_step`` (the run's global step number of ``start_step``; default ``epoch *
        steps + start_step``) seeds the crops of each step (`crop_generator`).
        """
        order = self.order(epoch)  # (L,) int64 on the CPU
        steps = len(order) // self.batch_size
        lo = self.rank * self.local_batch
        if self.data is not None:
            order = order.to(self.device)  # one copy per epoch; the steps slice it on the device
        idx_batches = [
            order[s * self.batch_size + lo : s * self.batch_size + lo + self.local_batch]
            for s in range(start_step, steps)
        ]
        if self.data is not None:
            for idx in idx_batches:
                yield self.data.index_select(0, idx).permute(0, 3, 1, 2), idx
        elif self.crops is not None:
            assert isinstance(self.images, FileImageSet)
            first = epoch * steps + start_step if first_step is None else first_step
            dl = self._workers(
                _CropBatches(self.images, idx_batches, self.crops, seed=self.seed, rank=self.rank, first_step=first)
            )
            for idx, xs in zip(idx_batches, dl, strict=True):
                yield [x.to(self.device, non_blocking=True).permute(0, 3, 1, 2) for x in xs], idx.to(self.device)
        else:
            dl = self._workers(_FileBatches(self.images, idx_batches))
            for idx, x in zip(idx_batches, dl, strict=True):
                yield x.to(self.device, non_blocking=True).permute(0, 3, 1, 2), idx.to(self.device)

    def _workers(self, batches: torch.utils.data.Dataset) -> Iterator[Any]:
        return from_workers(batches, self.workers, pin_memory=self.device.type == "cuda")


def from_workers(batches: torch.utils.data.Dataset, workers: int, *, pin_memory: bool = False) -> Iterator[Any]:
    """The items of `batches` (one item = one whole batch) decoded by DataLoader workers, in order.

    The workers ignore the stop signals (`_ignore_stop_signals`), so nothing but the main process
    can stop them: they are shut down here as soon as the iteration ends, also when it ends by an
    exception (a bad image) or is abandoned. Left to garbage collection, an exception kept alive by
    its caller kept them alive too, and at exit multiprocessing's terminate() (a SIGTERM they ignore)
    followed by join() waited for them forever.
    """
    dl = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                     persistent_workers=False, worker_init_fn=_ignore_stop_signals)
    it = iter(dl)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)  # absent with workers=0: nothing to stop
        if shutdown is not None:
            shutdown()


def _ignore_stop_signals(worker_id: int) -> None:
    # SIGTERM/SIGINT/SIGUSR1 reach the whole process group (SLURM signals every process of a job
    # step); the main process decides what to do (training stops after its step,
    # runtime.StopRequest) and shuts the workers down itself, so a worker must not die first.
    from instdisc.runtime import STOP_SIGNALS

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def eval_batches(
    images: ImageSet, batch_size: int, *, start: int = 0, stop: int | None = None,
    device: torch.device | str = "cpu", workers: int = 4, size: int | None = None,
) -> Iterator[Tensor]:
    """Images [start, stop) in dataset order, as (b, 3, H, W) uint8 batches on device.

    ``size``: a `FileImageSet` of `whole_images` then gives its evaluation view, the short side
    resized to ``round(size * 256 / 224)`` and the centre ``size x size`` crop
    (`FileImageSet.read_eval`); other sets are returned as stored either way
    (`instdisc.augment.preprocess` sizes them).
    """
    stop = len(images) if stop is None else stop
    if isinstance(images, ArrayImageSet):
        for s in range(start, stop, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images.images[s : min(s + batch_size, stop)]))
            yield x.to(device).permute(0, 3, 1, 2)
    else:
        batches = [torch.arange(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
        for x in from_workers(_FileBatches(images, batches, size), workers):  # e.g. the kNN monitor in training
            yield x.to(device).permute(0, 3, 1, 2)
