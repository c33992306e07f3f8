"""Evaluation image features computed once per (model, dataset files, transform) and reused by every
text-side method and seed of a sweep: safetensors files named by a digest of all three, so a change in
any of them is a different file (never a stale hit)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..checkpoint import load_tensors, save_tensors
from ..training import distributed


def model_digest(clip) -> str:
    """The model's identity and weights: architecture, pretrained tag, structure and every tensor's bytes."""
    digest = hashlib.sha256(json.dumps([clip.arch, clip.pretrained, clip.signature()], default=str).encode())
    for key, value in clip.model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _files(dataset) -> tuple[list[str], list[int]]:
    """The image files (in dataset order) and labels of a file dataset or a Subset of one."""
    indices, inner = getattr(dataset, "indices", None), getattr(dataset, "dataset", None)
    if indices is not None and inner is not None:
        paths, _ = _files(inner)
        return [paths[i] for i in indices], list(dataset.targets)
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError("the feature cache needs a dataset of image files (with `samples`)")
    return [str(path) for path, _ in samples], list(dataset.targets)


def _transform(dataset):
    while getattr(dataset, "transform", None) is None and getattr(dataset, "dataset", None) is not None:
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


class FeatureCache:
    """Image features of evaluation sets under `directory`, keyed by `model_digest`, the file list (paths,
    sizes and modification times) and the transform's description.

    Args:
        directory: where the `<key>.safetensors` files go.
        clip: the FrozenCLIP that encodes the images.
        batch_size: images per encoder call.
    """

    def __init__(self, directory, clip, batch_size: int = 256):
        self.directory, self.clip, self.batch_size = Path(directory), clip, batch_size
        self.model = model_digest(clip)
        self.hits = self.misses = 0

    def key(self, dataset) -> str:
        paths, labels = _files(dataset)
        digest = hashlib.sha256(self.model.encode())
        digest.update(repr(_transform(dataset)).encode())
        for path in paths:
            stat = Path(path).stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        digest.update(json.dumps(labels).encode())
        return digest.hexdigest()[:32]

    @torch.no_grad()
    def features(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, D] normalised image features, [N] labels) of `dataset`, from the cache or encoded now (under
        torchrun each rank encodes every W-th image, every rank gets them all, rank 0 writes the file)."""
        device = self.clip.device
        path = self.directory / f"{self.key(dataset)}.safetensors"
        if distributed.from_main(path.is_file(), device):
            self.hits += 1
            tensors = load_tensors(path)
            return tensors["features"].to(device), tensors["labels"].to(device)
        self.misses += 1
        index = distributed.shard(len(dataset))
        chunks, labels = [], []
        for images, targets in DataLoader(Subset(dataset, index.tolist()), batch_size=self.batch_size):
            chunks.append(self.clip.encode_image(images.to(device)).float())
            labels.append(torch.as_tensor(targets).to(device))
        if not chunks:  # a rank past the last image still joins the gather
            chunks, labels = [torch.zeros(0, self.clip.embed_dim, device=device)], [torch.zeros(0, device=device)]
        order = distributed.dataset_order(index, device)
        features = distributed.gather_cat(torch.cat(chunks))[order]
        labels = distributed.gather_cat(torch.cat(labels).long())[order]
        if distributed.is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            save_tensors({"features": features.cpu(), "labels": labels.cpu()}, path,
                         metadata={"n": str(len(labels)), "model": self.model[:16]})
        return features, labels
