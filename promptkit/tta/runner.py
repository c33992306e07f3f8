"""Test-time adaptation over a whole dataset: sharded over `torchrun` ranks, resumable from a directory of
per-batch prediction files, with throughput and peak memory.

Determinism is what makes sharding and resuming exact: the images are cut into batches of `batch_size` in
the given order, and before each batch the adapter's view generator is seeded from (adapter seed, batch
number). An episodic adapter's answer for a batch then depends on that batch alone, so the same batch gives
the same logits in one process or in many, in a first run or after a resume.

A stream adapter (TDA: its caches hold what it has seen) has no such answer: its predictions depend on the
order of all images before. One process runs the one stream, and resumes it from the caches saved with the
last finished batch. Over several ranks it runs only when asked (`independent_streams=True`): rank r is then
an independent stream over batches r, r + W, r + 2W, ... (W ranks) with its own caches, which is a different
experiment from the single stream (each cache sees 1/W of the data), so it is never done silently.

Layout of `out`: `config.json` (what the run is: a resume must match it), `batches/NNNNNNNN.safetensors`
(one per finished batch: `index` into the dataset, `label`, `topk_classes`, `topk_logits`, `logsumexp` and
`label_logit` of each image; written to a temporary file and renamed, so a batch is there whole or not at
all), and for streams `streams/NNNNNNNN.safetensors` (the stream's state after that batch; only the newest
of each stream is kept).
"""
from __future__ import annotations

import hashlib
import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._keywords import jsonable
from ..checkpoint import load_json, load_tensors, save_json, save_tensors
from ..metrics import classification_metrics
from ..training import distributed

FIELDS = ("index", "label", "topk_classes", "topk_logits", "logsumexp", "label_logit")


def adapt_dataset(adapter, dataset, batch_size: int = 16, indices=None, out=None, resume: bool = False,
                  top_k: int = 5, workers: int = 0, independent_streams: bool = False, progress: bool = True,
                  description: str | None = None) -> dict:
    """Runs `adapter` over `dataset` and scores its predictions.

    Under `torchrun` (an initialised process group) the batches are shared out over the ranks and the
    predictions gathered on every rank: for an episodic adapter (TPT, C-TPT, Zero) the metrics equal one
    process's. A stream adapter (TDA) over several ranks needs `independent_streams=True` (see the module
    docstring). Every rank must call this with the same arguments.

    Args:
        adapter: a test-time adapter (`ViewAdapter`: TPT, CTPT, Zero, TDA).
        dataset: (image, label) pairs; images as PIL images or preprocessed tensors [3, H, W].
        batch_size: images adapted at once; part of the run's identity (it decides the batches).
        indices: the dataset indices to adapt, distinct, in order (default: all, in dataset order).
        out: directory for the per-batch predictions (on a file system every rank sees), or None to keep
            them in memory only.
        resume: continue the run in `out`: finished batches are read back, not recomputed. The run must be
            the same (adapter and its settings, learner and its prompts, model, images, batch size, top_k),
            else a ValueError says which setting differs. Without `resume`, an `out` that already holds a
            run is refused rather than overwritten.
        top_k: logits kept per image (>= 5, or all classes when fewer): with the log-sum-exp and the true
            class's logit they give top-1, top-5, ECE and NLL exactly.
        workers: image decoding processes (0: in this process).
        independent_streams: let a stream adapter run over several ranks, one independent stream per rank.
        progress: show a progress bar (images/s and time left) on rank 0.
        description: the progress bar's label.

    Returns:
        `classification_metrics` of all the predictions (`top1`, `top5`, `ece`, `nll`, ...; `n` images),
        plus `adapted` (images adapted by this call, all ranks), `resumed` (read back from `out`), `seconds`,
        `images_per_s` and `seconds_per_image` (of this call's adaptation, None when nothing was left),
        `peak_memory_mb` (the largest over ranks: CUDA's max_memory_allocated on a GPU, the resident set's
        peak on CPU), `ranks`, and `predictions`: the stored fields (`FIELDS`), one row per image, in the
        order of `indices`.
    """
    start = time.time()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    stream = not adapter.episodic
    check_ranks(type(adapter), world, independent_streams)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_classes = adapter.learner.n_classes
    if top_k < min(5, n_classes):
        raise ValueError(f"top_k must be >= 5 (top-5 accuracy needs them), got {top_k}")
    top_k = min(top_k, n_classes)
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    if not order:
        raise ValueError("no images to adapt (empty dataset or indices)")
    if len(set(order)) != len(order):
        raise ValueError(f"indices repeat images ({len(order)} indices, {len(set(order))} distinct): each image is "
                         f"adapted and scored once; pass distinct indices")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out = Path(out) if out is not None else None
    done = {}
    if out is not None:
        config = run_config(adapter, dataset, order, batch_size, top_k, world if stream else None)
        done = _open_run(out, config, resume, len(batches), rank)
    if stream:  # each stream's batches in order; a resumed stream continues after its last finished batch
        mine = list(range(rank, len(batches), world))
        finished = [b for b in mine if b in done]
        if finished != mine[:len(finished)]:
            raise ValueError(f"{out} is damaged: stream {rank} has batches {finished} but not all before them")
        state = out / "streams" / f"{finished[-1]:08d}.safetensors" if finished else None
        if state is not None:
            adapter.load_stream_state(load_tensors(state))
        todo = mine[len(finished):]
    else:
        state, todo = None, [b for b in range(len(batches)) if b not in done][rank::world]
    device = adapter.learner.clip.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    computed = _adapt_batches(adapter, dataset, batches, todo, out, top_k, workers,
                              progress and distributed.is_main(), description, stream, state)
    adapted_seconds = time.time() - start
    predictions = {name: distributed.gather_cat(computed[name].to(device)).cpu() for name in FIELDS}
    for batch in sorted(done):  # read back on every rank, so that every rank returns the whole result
        for name, value in load_tensors(done[batch]).items():
            predictions[name] = torch.cat([predictions[name], value])
    position = {index: i for i, index in enumerate(order)}
    predictions = {name: value[torch.tensor([position[int(i)] for i in predictions["index"]]).argsort()]
                   for name, value in predictions.items()}
    adapted = len(order) - sum(len(batches[b]) for b in done)
    peak = _peak_memory_mb(device)
    peak = float(distributed.gather_cat(torch.tensor([peak], device=device)).max())
    metrics = classification_metrics(logits_from_predictions(predictions, n_classes), predictions["label"])
    return {**metrics, "adapted": adapted, "resumed": len(order) - adapted, "seconds": time.time() - start,
            "images_per_s": adapted / adapted_seconds if adapted else None,
            "seconds_per_image": adapted_seconds / adapted if adapted else None,
            "peak_memory_mb": peak, "ranks": world, "predictions": predictions}


def check_ranks(adapter_cls, world: int, independent_streams: bool) -> None:
    """Refuses a stream adapter over several ranks unless independent streams were asked for."""
    if not adapter_cls.episodic and world > 1 and not independent_streams:
        raise ValueError(f"{adapter_cls.__name__} is a stream (what it predicts depends on every image before), so "
                         f"{world} processes cannot give the one-stream result. Run it in one process, or pass "
                         f"--independent-streams (independent_streams=True) for one independent stream per "
                         f"process, each over 1/{world} of the batches.")


def run_config(adapter, dataset, order, batch_size: int, top_k: int, streams: int | None) -> dict:
    """What a run in `out` is, as JSON: a resume must match it in every key."""
    from ..training.cli import keyword_types
    from ..training.trainer import data_fingerprint

    learner, clip = adapter.learner, adapter.learner.clip
    digest = hashlib.sha256()
    for name, tensor in sorted(learner.prompt_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    images = data_fingerprint(_Subset(dataset, order), torch.empty(0))["fingerprint"]
    settings = {key: jsonable(getattr(adapter, key)) for key in keyword_types(type(adapter)) if hasattr(adapter, key)}
    return {"adapter": getattr(adapter, "method", type(adapter).__name__), "settings": settings,
            "learner": learner.method, "hparams": learner.hparams, "classnames": list(learner.classnames),
            "prompts": digest.hexdigest(), "model": {"arch": clip.arch, "pretrained": clip.pretrained},
            "images": {"n": len(order), "fingerprint": images}, "batch_size": batch_size, "top_k": top_k,
            "streams": streams}


def _open_run(out: Path, config: dict, resume: bool, n_batches: int, rank: int) -> dict:
    """Checks or starts the run in `out`; returns {batch number: file} of the finished batches."""
    saved_path = out / "config.json"
    exists = saved_path.exists()
    _barrier()  # every rank has looked before rank 0 writes: all ranks take the same branch
    if exists:
        if not resume:
            raise FileExistsError(f"{out} already holds a TTA run; pass --resume (resume=True) to continue it, "
                                  f"or choose another output directory")
        saved = load_json(saved_path)
        different = _differences(saved, json.loads(json.dumps(config)))
        if different:
            raise ValueError(f"cannot resume the run in {out}: it was made with other settings ("
                             + "; ".join(_short(d) for d in different) + "). Use another output directory.")
    elif distributed.is_main():
        save_json(config, saved_path)
    _barrier()  # every rank lists the same finished batches, before any rank writes new ones
    done = {int(p.stem): p for p in (out / "batches").glob("*.safetensors")} if resume else {}
    if any(b >= n_batches for b in done):
        raise ValueError(f"{out} holds batch files beyond the run's {n_batches} batches: not this run's")
    _barrier()
    return done


def _adapt_batches(adapter, dataset, batches, todo, out, top_k, workers, progress, description, stream,
                   previous_state) -> dict:
    """Adapts the batches `todo`, storing each in `out` (with the stream's state, replacing `previous_state`)."""
    rows = {name: [] for name in FIELDS}
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in todo], num_workers=workers,
                        collate_fn=_collate)  # decoding overlaps adaptation
    with tqdm(total=sum(len(batches[b]) for b in todo), desc=description, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:  # tqdm shows images/s and the time left; closed on errors too
        for batch, (images, labels) in zip(todo, loader):
            adapter.generator.manual_seed(_batch_seed(adapter.seed, batch))
            record = predictions_of(adapter(images), torch.tensor(labels), torch.tensor(batches[batch]), top_k)
            if out is not None:
                # The stream's state first: a kill between the two files leaves a state that no finished batch
                # names, which a resume ignores; the batch file is the commit.
                if stream:
                    state = out / "streams" / f"{batch:08d}.safetensors"
                    save_tensors(adapter.stream_state(), state)
                save_tensors(record, out / "batches" / f"{batch:08d}.safetensors")
                if stream:
                    if previous_state is not None:
                        previous_state.unlink(missing_ok=True)
                    previous_state = state
            for name in FIELDS:
                rows[name].append(record[name])
            bar.update(len(record["label"]))
    empty = {"index": (0,), "label": (0,), "topk_classes": (0, top_k), "topk_logits": (0, top_k),
             "logsumexp": (0,), "label_logit": (0,)}
    dtypes = {"index": torch.long, "label": torch.long, "topk_classes": torch.long}
    return {name: torch.cat(rows[name]) if rows[name] else torch.zeros(empty[name], dtype=dtypes.get(name))
            for name in FIELDS}


def predictions_of(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, top_k: int) -> dict:
    """What is stored of logits [B, C] (the `FIELDS`): enough for every metric but ranks below `top_k`."""
    logits = logits.detach().float().cpu()
    top = logits.topk(top_k, dim=1)
    return {"index": index, "label": labels, "topk_classes": top.indices, "topk_logits": top.values,
            "logsumexp": logits.logsumexp(1), "label_logit": logits.gather(1, labels[:, None])[:, 0]}


def logits_from_predictions(predictions: dict, n_classes: int) -> torch.Tensor:
    """Logits [N, C] with the same top-k, softmax of the top-k and of the true class, and log-sum-exp as the
    adapter's: the classes not stored share the probability left over equally. Every metric of
    `classification_metrics` but the ranks below k is then the one of the full logits (up to rounding)."""
    n = len(predictions["label"])
    top_classes, top_logits = predictions["topk_classes"], predictions["topk_logits"].double()
    lse, labels = predictions["logsumexp"].double(), predictions["label"]
    label_in_top = (top_classes == labels[:, None]).any(1)
    stored = top_logits.sub(lse[:, None]).exp().sum(1) + torch.where(
        label_in_top, 0.0, predictions["label_logit"].double().sub(lse).exp())
    rest = n_classes - top_classes.shape[1] - (~label_in_top).long()
    fill = lse + (1 - stored).clamp(min=1e-300).log() - rest.clamp(min=1).double().log()
    fill = torch.minimum(fill, top_logits[:, -1])  # never above the k-th (rounding when the top-k hold it all)
    logits = fill[:, None].expand(n, n_classes).clone()
    logits[torch.arange(n), labels] = predictions["label_logit"].double()
    logits.scatter_(1, top_classes, top_logits)
    return logits.float()


def _batch_seed(seed: int, batch: int) -> int:
    """The view generator's seed for one batch: a function of (seed, batch) only, so a batch gets the same
    views whichever rank runs it and whenever."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{batch}".encode()).digest()[:8], "little") >> 1


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _differences(saved, now, prefix: str = "") -> list[str]:
    """'key: saved A, now B' for each setting that differs, nested settings named by their path (settings.lr)."""
    out = []
    for key in now.keys() | saved.keys():
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: saved {a!r}, now {b!r}")
    return sorted(out)


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _collate(samples):
    """PIL images stay a list (the adapter preprocesses them); tensors are stacked."""
    images, targets = zip(*samples)
    return (torch.stack(images) if torch.is_tensor(images[0]) else list(images)), [int(t) for t in targets]


class _Subset:
    """The images of a run, in order, as `data_fingerprint` reads a torch Subset."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices, self.classnames = dataset, indices, getattr(dataset, "classnames", [])

