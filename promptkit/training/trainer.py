"""PromptTrainer: trains only a learner's prompt parameters; fast, resumable, single or multi-process."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import WEIGHTS_NAME, atomic_write, load_json, load_tensors, save_json, save_tensors
from ..metrics import classification_metrics
from . import distributed
from .config import TrainConfig

CHECKPOINT = "checkpoint"
# Settings a resumed run may change: how long it runs and how it is carried out, not what it learns so far.
RESUMABLE = {"epochs", "eval_every", "checkpoint_every", "log_every", "progress", "num_workers", "device",
             "eval_batch_size", "output_dir", "ece_bins"}


class NonFiniteLossError(RuntimeError):
    pass


def _write_csv(path, columns, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def data_fingerprint(dataset, labels: torch.Tensor) -> dict:
    """Size and a digest of a dataset's identity: class names, labels (and tasks) and which samples (file paths,
    subset indices, or the bytes of in-memory tensors), so a resume can tell that the data changed."""
    identity = [list(getattr(dataset, "classnames", [])), labels.tolist()]
    if getattr(dataset, "task_ids", None) is not None:
        identity += [dataset.tasks, list(dataset.task_ids)]
    digest = hashlib.sha256(json.dumps(identity).encode())
    _digest_samples(dataset, digest)
    return {"n": len(labels), "fingerprint": digest.hexdigest()}


def _digest_samples(dataset, digest) -> None:
    indices, inner = getattr(dataset, "indices", None), getattr(dataset, "dataset", None)
    if indices is not None and inner is not None:  # Subset-like
        digest.update(json.dumps(list(map(int, indices))).encode())
        _digest_samples(inner, digest)
        return
    parts = getattr(dataset, "datasets", None)
    if isinstance(parts, dict):  # MultiTaskDataset
        for part in parts.values():
            _digest_samples(part, digest)
        return
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        digest.update(json.dumps([str(sample[0]) for sample in samples]).encode())
        return
    tensors = getattr(dataset, "tensors", None) or [getattr(dataset, "images", None)]
    for t in tensors:
        if torch.is_tensor(t):
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


class PromptTrainer:
    """Trains `learner.prompt_parameters()` and nothing else.

    The loss is `learner.training_loss(...)`: methods add their terms there, never here. A multi-task dataset
    (`promptkit.data.MultiTaskDataset`: samples `(image, label, task)`) trains a learner built with its
    `tasks`: each batch's task ids go to `training_loss(..., task=)` and evaluation scores per task. Text
    features are computed once per step (inside the loss) and once per evaluation; image features
    are encoded once per image when the learner's image path carries no prompt (see
    `TrainConfig.cache_image_features`).

    Args:
        learner: a `PromptLearner`.
        config: a `TrainConfig` (default: CoOp's recipe).
    """

    def __init__(self, learner, config: TrainConfig | None = None):
        self.learner, self.config = learner, config or TrainConfig()
        name = self.config.device
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        self.rank, self.world = distributed.setup(self.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
        self.learner.to(self.device)
        self.out = Path(self.config.output_dir) if self.config.output_dir else None
        self.history: list[dict] = []

    # -- public ------------------------------------------------------------------------------------
    def fit(self, train_dataset, val_dataset=None, resume: bool = False) -> dict:
        """Trains for `config.epochs`; with `resume=True` continues from `output_dir/checkpoint`.
        A learner that defines `fit(features, labels, val_features, val_labels)` is first built from the image
        features (and trained only if it then has prompt parameters).
        Returns the last evaluation (or training) metrics."""
        cfg, learner = self.config, self.learner
        from ..data import Unlabeled, has_random_transform, is_unlabeled  # augmentation lives in the dataset

        unlabeled = is_unlabeled(train_dataset)
        if unlabeled:
            supervised = [o.name for o in getattr(learner, "objectives", []) if o.needs_labels]
            if supervised:
                raise ValueError(f"the training data has no labels, but {learner.method}'s objectives "
                                 f"{supervised} need them; train on labelled data, or give the learner objectives "
                                 f"that read no label, e.g. objectives=['pouf'] or ['self-learning'] (or the "
                                 f"methods pouf, self-learning)")
            train_dataset = train_dataset if getattr(train_dataset, "labeled", True) is False else Unlabeled(
                train_dataset, getattr(learner, "classnames", None))
        labels = self._check_dataset(train_dataset, unlabeled=unlabeled)
        tasks = self._task_ids(train_dataset)

        if cfg.augment and not has_random_transform(train_dataset) and distributed.is_main():
            warnings.warn(f"config.augment is {cfg.augment} but the training data's transform has no random op, so "
                          f"the run is not augmented; build the training set with transform="
                          f"promptkit.data.train_transform(clip, **config.augment)")
        self._run = {"method": learner.method, "hparams": learner.hparams, "classnames": learner.classnames,
                     "data": data_fingerprint(train_dataset, labels)}
        whole = [o.name for o in getattr(learner, "objectives", []) if o.whole_batch]
        if whole and cfg.grad_accum_steps > 1:
            raise ValueError(f"objective {whole[0]} compares the images of a batch with each other, so it needs the "
                             f"whole batch at once: set grad_accum_steps=1 (under torchrun the ranks' batches are "
                             f"gathered)")
        if cfg.batch_size % (self.world * cfg.grad_accum_steps):
            raise ValueError(f"batch_size {cfg.batch_size} must split evenly over {self.world} processes x "
                             f"{cfg.grad_accum_steps} accumulation steps")
        # A learner built from data (Tip-Adapter's cache, the linear probe) defines `fit`: it gets the cached image
        # features, averaged over the cache passes, before any epoch (its tensors may change shape, so before the
        # optimizer), and the validation set's features.
        build = getattr(learner, "fit", None)
        features = self._cache_features(train_dataset) if self._use_cache() or build else None
        if build is not None:
            val = (self._cache_features(val_dataset, passes=1)[0], self._check_dataset(val_dataset).to(self.device)
                   ) if val_dataset is not None else (None, None)
            build(features.mean(0), labels.to(self.device), *val)
            features = features if self._use_cache() else None
        # Objectives that choose from the whole training set (UPL's top-K per class) see its frozen features first.
        preparing = [o for o in getattr(learner, "objectives", []) if o.uses_dataset]
        if preparing:
            frozen = self._cache_features(train_dataset, passes=1, frozen=True)[0]
            for objective in preparing:
                objective.prepare(learner, frozen)
        params = learner.prompt_parameters()
        if not params and build is None:
            raise ValueError(f"{learner.method or type(learner).__name__} has no prompt parameters to train")
        # Every rank starts from rank 0's prompts, however each process initialised its learner.
        distributed.broadcast(list(learner.prompt_state_dict().values()))
        if not params:  # fitted from the features alone: nothing to train
            return self._finish(val_dataset)
        optimizer = self._optimizer(params)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and self.device.type == "cuda")
        start_epoch, step, best = 0, 0, None
        if resume:
            start_epoch, step, best = self._load_checkpoint(optimizer, scaler)
        if self.out and distributed.is_main():  # once the run is accepted: a refused resume keeps the old one
            self.out.mkdir(parents=True, exist_ok=True)
            self.config.save(self.out / "config.json")
        n = len(labels)
        batch = min(cfg.batch_size, n - n % self.world) if n < cfg.batch_size else cfg.batch_size
        steps_per_epoch = n // batch
        self._log_line(f"training {learner.method}: {sum(p.numel() for p in params)} prompt parameters, {n} images, "
                       f"{steps_per_epoch} steps/epoch, {self.world} process(es), image-feature cache: "
                       f"{'on, %d pass(es)' % cfg.cache_passes if features is not None else 'off'}")
        metrics = {}
        for epoch in range(start_epoch, cfg.epochs):
            learner.train()
            learner.on_epoch_start(epoch, cfg.epochs)
            for group in optimizer.param_groups:
                group["lr"] = self.lr_at(epoch, group["group"])
            torch.manual_seed(cfg.seed * 100003 + epoch)  # all randomness of an epoch: f(seed, epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not (cfg.progress and distributed.is_main()))
            seen, correct, loss_sum, tic = 0, torch.zeros(()), torch.zeros(()), time.time()
            term_sums: dict[str, torch.Tensor] = {}  # every objective's term, summed over this rank's images
            local_batches = [order[i * batch:(i + 1) * batch].view(self.world, -1)[self.rank]
                             for i in range(steps_per_epoch)]
            # Without the cache, images come through a DataLoader (num_workers) in this rank's batch order.
            loader = None if features is not None else iter(self._loader(train_dataset, local_batches))
            for i in bar:
                local = local_batches[i]
                images = None if loader is None else next(loader)[0]
                loss, n_correct, terms = self._step(optimizer, scaler, params, local, labels, features, images,
                                                    epoch, step, tasks)
                step += 1
                seen += batch
                loss_sum += loss.detach().cpu() * len(local)
                for name, value in terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value * len(local)
                correct += n_correct.cpu()
                if cfg.log_every and step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen / (time.time() - tic):.0f}",
                                    **({} if unlabeled else {"acc": f"{100 * correct.item() / max(seen // self.world, 1):.1f}"}))
            learner.on_epoch_end(epoch + 1, cfg.epochs)
            local_seen = max(seen // self.world, 1)
            metrics = {"epoch": epoch + 1, "step": step, "lr": self.lr_at(epoch),
                       "train_loss": loss_sum.item() / local_seen,
                       **({} if unlabeled else {"train_top1": 100 * correct.item() / local_seen}),
                       **{f"train_{name}": float(value) / local_seen for name, value in term_sums.items()},
                       "images_per_s": seen / max(time.time() - tic, 1e-9)}
            last = epoch + 1 == cfg.epochs
            if val_dataset is not None and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                val = self.evaluate(val_dataset)
                metrics.update({f"val_{k}": v for k, v in val.items() if k in ("top1", "top5", "macro_f1", "ece")})
                best = val["top1"] if best is None else max(best, val["top1"])
            self._log_metrics(metrics)
            if self.out and (last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0)):
                self._save_checkpoint(optimizer, scaler, epoch + 1, step, best)
        if self.out and distributed.is_main():
            learner.save_pretrained(self.out / "prompts")
            self._log_line(self.summary())
        return metrics

    def _finish(self, val_dataset) -> dict:
        """Ends a run with nothing to train: evaluates on `val_dataset` (if any) and saves the learner."""
        metrics = {}
        if val_dataset is not None:
            metrics = {f"val_{k}": v for k, v in self.evaluate(val_dataset).items()
                       if k in ("top1", "top5", "macro_f1", "ece")}
        self._log_line(f"fitted {self.learner.method} from the image features; nothing to train"
                       + "".join(f" {k}={v:.4g}" for k, v in metrics.items()))
        if self.out and distributed.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            self.config.save(self.out / "config.json")
            self.learner.save_pretrained(self.out / "prompts")
        return metrics

    @torch.no_grad()
    def evaluate(self, dataset, groups=None, attack: str | None = None, eps: float = 1 / 255, steps: int = 100,
                 step_size: float = 1 / 255, random_start: bool = True, seed: int = 0) -> dict:
        """`top1`, `top5`, `macro_f1`, `per_class`, `ece` (percent), `nll`, `n`; with `groups` (one integer
        per sample, in dataset order) also `per_group` and `worst_group`. Text features once per evaluation;
        under torchrun each rank evaluates a shard and the results are gathered.

        With `attack="pgd"` each batch is also attacked (`promptkit.attacks.pgd`: L-inf PGD on pixels in [0, 1],
        before the normalisation, with the true labels) and the metrics gain `robust_top1` (top-1 on the attacked
        images; `top1` stays the clean one) and `attack` (the budget). The defaults are TeCoA's evaluation
        budget (eps 1/255, 100 steps of 1/255, random start); `seed` fixes the random starts.

        Raises:
            ValueError: an unknown attack or a budget PGD cannot run with (eps < 0, ...).
            promptkit.attacks.NotDifferentiableError: the learner's logits carry no gradient to the image.
        """
        from ..attacks import ATTACKS, check_budget, pgd, pixel_normalization

        learner, cfg = self.learner, self.config
        if attack is not None:
            if attack not in ATTACKS:
                raise ValueError(f"unknown attack {attack!r}; attacks: {', '.join(ATTACKS)}")
            check_budget(eps, steps, step_size)
            mean, std = pixel_normalization(learner.clip)
            generator = torch.Generator().manual_seed(seed * 1000003 + self.rank)
        self._check_dataset(dataset)
        tasks = self._task_ids(dataset)
        if tasks is not None and groups is None:
            groups = tasks.tolist()
        learner.eval()
        index = distributed.shard(len(dataset))
        with self._autocast():
            text = learner.text_features()
            logits, robust, labels = [], [], []
            for batch in self._loader(dataset, index.split(cfg.eval_batch_size)):
                images, targets = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device)
                out = learner(images, text_features=text).float()
                logits.append(out if tasks is None else learner.task_logits(out, batch[2]))
                labels.append(targets)
                if attack is not None:
                    adversarial = pgd(lambda x: learner(x, text_features=text), images, targets, eps=eps, steps=steps,
                                      step_size=step_size, mean=mean, std=std, random_start=random_start,
                                      generator=generator)
                    robust.append(learner(adversarial, text_features=text).float())
        logits = distributed.gather_cat(torch.cat(logits))
        labels = distributed.gather_cat(torch.cat(labels))
        robust_top1 = None
        if attack is not None:  # in the gathered (rank) order, as `labels` still is
            robust_correct = distributed.gather_cat(torch.cat(robust)).argmax(-1) == labels
            robust_top1 = 100 * robust_correct.float().mean().item()
        if groups is not None:  # the shards come in rank order: back to dataset order, where `groups` is
            order = distributed.dataset_order(index, self.device)
            logits, labels = logits[order], labels[order]
        metrics = classification_metrics(logits, labels, n_bins=cfg.ece_bins, groups=groups)
        if tasks is not None and "per_group" in metrics:
            metrics["per_task"] = {name: metrics["per_group"][t] for t, name in enumerate(dataset.task_names)
                                   if t in metrics["per_group"]}
        if attack is not None:
            metrics["robust_top1"] = robust_top1
            metrics["attack"] = {"name": attack, "eps": eps, "steps": steps, "step_size": step_size,
                                 "random_start": random_start, "seed": seed}
        return metrics

    def lr_at(self, epoch: int, group: str | None = None) -> float:
        """Learning rate of a 0-based epoch, as Dassl (CoOp and the papers built on it) schedules it: constant
        warm-up, then a cosine over `epochs` whose count restarts after the warm-up (Dassl's default
        `WARMUP_RECOUNT=True`), so the first epoch after the warm-up runs at the full rate. `group` names one
        of `config.param_groups`, whose own lr and warm-up apply."""
        cfg = self.config
        own = (cfg.param_groups or {}).get(group, {}) if group else {}
        lr, warmup = own.get("lr", cfg.lr), own.get("warmup_epochs", cfg.warmup_epochs)
        if epoch < warmup:
            return own.get("warmup_lr", cfg.warmup_lr)
        if cfg.scheduler == "constant":
            return lr
        return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup) / cfg.epochs))

    def summary(self) -> str:
        rows = [h for h in self.history]
        if not rows:
            return "no epochs run"
        keys = [k for k in ("epoch", "train_loss", "train_top1", "val_top1", "val_ece", "images_per_s") if k in rows[-1]]
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for h in rows[-min(len(rows), 5):]:
            lines.append("| " + " | ".join(f"{h[k]:.4g}" if isinstance(h[k], float) else str(h[k]) for k in keys) + " |")
        return "\n".join(lines)

    # -- steps ---------------------------------------------------------------------------------------
    def _step(self, optimizer, scaler, params, local, labels, features, images, epoch, step, tasks=None):
        """One optimizer step on this rank's part of the global batch: cached `features` or loaded `images`
        (and, for a multi-task dataset, every sample's task id from `tasks`)."""
        cfg, learner = self.config, self.learner
        optimizer.zero_grad(set_to_none=True)
        total, n_correct = torch.zeros((), device=self.device), torch.zeros((), dtype=torch.long, device=self.device)
        term_grads: dict[str, list[torch.Tensor]] = {}  # whole-batch gradients of `gradient_terms`, per term
        terms: dict[str, torch.Tensor] = {}  # the objectives' terms, averaged over micro-batches (for the log)
        reached: set[int] = set()  # parameters any gradient term reached (the others keep grad None, as backward)
        image_chunks = None if images is None else images.chunk(cfg.grad_accum_steps)
        for j, micro in enumerate(local.chunk(cfg.grad_accum_steps)):
            y = labels[micro].to(self.device)
            task = {} if tasks is None else {"task": tasks[micro].to(self.device)}
            with self._autocast():
                if features is not None:
                    out = learner.training_loss(y, image_features=features[epoch % len(features)][micro].to(self.device),
                                                **task)
                else:
                    out = learner.training_loss(y, image_chunks[j].to(self.device, non_blocking=True), **task)
            loss = out.loss / cfg.grad_accum_steps
            if out.gradient_terms:
                for name, term in out.gradient_terms.items():
                    grads = torch.autograd.grad(scaler.scale(term / cfg.grad_accum_steps), params,
                                                retain_graph=True, allow_unused=True)
                    sums = term_grads.setdefault(name, [torch.zeros_like(p) for p in params])
                    for i, (s, g) in enumerate(zip(sums, grads)):
                        if g is not None:
                            s += g
                            reached.add(i)
            else:
                scaler.scale(loss).backward()
            total += loss.detach()
            n_correct += (out.logits.detach().argmax(-1) == y).sum()
            for name, value in out.terms.items():
                terms[name] = terms.get(name, 0) + value.detach().float() / cfg.grad_accum_steps
        if not torch.isfinite(total):  # one host sync per step: a bad update must never be applied
            if cfg.nan_policy == "skip":
                warnings.warn(f"non-finite loss {total.item()} at step {step + 1} (epoch {epoch + 1}): step skipped")
                optimizer.zero_grad(set_to_none=True)
                return total, n_correct, terms
            raise NonFiniteLossError(
                f"loss is {total.item()} at step {step + 1} (epoch {epoch + 1}); the last good checkpoint in "
                f"{self.out / CHECKPOINT if self.out else '(no output_dir)'} is kept. The images were finite (they are "
                f"checked), so the prompts diverged: lower the learning rate, use fp32/bf16, set grad_clip, or set "
                f"nan_policy='skip'.")
        if term_grads:
            distributed.average([g for grads in term_grads.values() for g in grads])
            for i, (p, g) in enumerate(zip(params, learner.combine_gradients(term_grads))):
                p.grad = g if i in reached or self.world > 1 else None
        else:
            distributed.average_gradients(params)
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        return total, n_correct, terms

    def _optimizer(self, params):
        """One optimizer over the prompts; `config.param_groups` (name prefix -> lr, warm-up, weight decay) puts
        the prompts they name in groups of their own, as separate optimizers would (DPT's text and visual)."""
        cfg = self.config
        named = [(name, p) for name, p in self.learner.named_parameters() if not name.startswith("clip.")]
        groups = {None: []}
        for prefix in cfg.param_groups or {}:
            groups[prefix] = [p for name, p in named if name == prefix or name.startswith(prefix + ".")]
            if not groups[prefix]:
                raise ValueError(f"param_groups names {prefix!r}, which matches none of {self.learner.method}'s "
                                 f"prompts: {', '.join(name for name, _ in named)}")
        grouped = {id(p) for members in groups.values() for p in members}
        groups[None] = [p for p in params if id(p) not in grouped]
        options = [{"params": members, "group": prefix,
                    "weight_decay": (cfg.param_groups or {}).get(prefix, {}).get("weight_decay", cfg.weight_decay)}
                   for prefix, members in groups.items() if members]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(options, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.AdamW(options, lr=cfg.lr)

    def _autocast(self):
        cfg = self.config
        enabled = cfg.precision != "fp32" and self.device.type == "cuda"
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def _use_cache(self) -> bool:
        setting = self.config.cache_image_features
        if setting is True and self.learner.image_prompted:
            raise ValueError(f"cache_image_features=True but {self.learner.method} puts prompts into the image "
                             f"encoder, so its image features change every step; use 'auto' or False")
        attacking = [o.name for o in getattr(self.learner, "objectives", []) if o.needs_images]
        if setting is True and attacking:
            raise ValueError(f"cache_image_features=True but objective {attacking[0]} needs the images themselves "
                             f"(it attacks them); use 'auto' or False")
        return bool(setting) and not self.learner.image_prompted and not attacking

    @torch.no_grad()
    def _cache_features(self, dataset, passes: int | None = None, frozen: bool = False) -> torch.Tensor:
        """[passes, N, D] image features, each image encoded once per pass (`config.cache_passes` by default;
        every rank encodes all); with `frozen`, plain CLIP's (no image prompt)."""
        self.learner.eval()
        encode = self.learner.clip.encode_image if frozen else self.learner.encode_image
        out = []
        for p in range(self.config.cache_passes if passes is None else passes):
            torch.manual_seed(self.config.seed * 7919 + p)
            chunks = []
            with self._autocast():
                for batch in self._loader(dataset, torch.arange(len(dataset)).split(self.config.eval_batch_size)):
                    chunks.append(encode(batch[0].to(self.device)).float())
            out.append(torch.cat(chunks))
        return torch.stack(out)

    def _loader(self, dataset, batches):
        return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=self.config.num_workers,
                          pin_memory=self.device.type == "cuda")

    def _check_dataset(self, dataset, unlabeled: bool = False) -> torch.Tensor:
        """The labels of `dataset` ([N] of -1 when `unlabeled`), checked against the learner's classes."""
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        names = getattr(dataset, "classnames", None)
        n_classes = self.learner.n_classes
        if names is not None and len(names) != n_classes:
            raise ValueError(f"the dataset has {len(names)} classes but the learner was built for {n_classes}; "
                             f"build the learner with the dataset's classnames")
        if unlabeled:
            return torch.full((len(dataset),), -1, dtype=torch.long)
        from ..data import is_unlabeled

        if is_unlabeled(dataset):
            raise ValueError("the dataset has no labels; evaluation (and validation) needs labelled images")
        targets = getattr(dataset, "targets", None)
        labels = torch.as_tensor(targets if targets is not None else [dataset[i][1] for i in range(len(dataset))])
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"labels must be in [0, {n_classes}); found [{int(labels.min())}, {int(labels.max())}]")
        return labels.long()

    def _task_ids(self, dataset) -> torch.Tensor | None:
        """Each sample's task id of a multi-task dataset (None for a single-task one), checked against the
        learner's tasks."""
        ids = getattr(dataset, "task_ids", None)
        if ids is None:
            return None
        learner_tasks = getattr(self.learner, "tasks", None)
        if learner_tasks is None:
            raise ValueError(f"the dataset has tasks {list(dataset.tasks)} but the learner was built without them; "
                             f"build it with create_learner(method, clip, dataset.classnames, tasks=dataset.tasks)")
        if dict(learner_tasks) != dict(dataset.tasks) or list(learner_tasks) != list(dataset.tasks):
            raise ValueError(f"the dataset's tasks {list(dataset.tasks)} (and their classes) differ from the "
                             f"learner's {list(learner_tasks)}; build the learner with tasks=dataset.tasks")
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.min() < 0 or ids.max() >= len(learner_tasks):
            raise ValueError(f"task ids must be in [0, {len(learner_tasks)}); found [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        return ids

    # -- checkpoints and logs ---------------------------------------------------------------------------
    def _save_checkpoint(self, optimizer, scaler, epoch, step, best) -> None:
        """Writes a complete new checkpoint directory, then swaps it in: a kill at any moment leaves a
        loadable checkpoint (`checkpoint/`, or `checkpoint.old/` during the swap)."""
        if not distributed.is_main():
            return
        final, old = self.out / CHECKPOINT, self.out / f"{CHECKPOINT}.old"
        tmp = self.out / f"{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors(self.learner.prompt_state_dict(), tmp / WEIGHTS_NAME)
        state = optimizer.state_dict()
        tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
        save_tensors(tensors, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_tensors(rng, tmp / "rng_state.safetensors")
        save_json({"epoch": epoch, "global_step": step, "best_metric": best, "config": self.config.to_dict(),
                   **self._run, "optimizer_param_groups": state["param_groups"],
                   "scheduler": {"last_epoch": epoch, "lr": self.lr_at(max(epoch - 1, 0))},
                   "scaler": scaler.state_dict() if scaler.is_enabled() else None, "history": self.history},
                  tmp / "trainer_state.json")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, optimizer, scaler) -> tuple[int, int, float | None]:
        directory = self.out / CHECKPOINT if self.out else None
        if directory is not None and not directory.exists() and (self.out / f"{CHECKPOINT}.old").exists():
            directory = self.out / f"{CHECKPOINT}.old"  # killed during the swap
        if directory is None or not (directory / "trainer_state.json").exists():
            warnings.warn(f"resume=True but no checkpoint in {self.out}; starting from scratch")
            return 0, 0, None
        state = load_json(directory / "trainer_state.json")
        self._check_resume(directory, state)
        self.learner.load_prompt_state_dict(load_tensors(directory / WEIGHTS_NAME))
        tensors = load_tensors(directory / "optimizer.safetensors")
        per_param: dict = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value.to(self.device)
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
        rng = load_tensors(directory / "rng_state.safetensors")
        torch.set_rng_state(rng["cpu"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        self.history = state.get("history", [])
        self._log_line(f"resumed from {directory}: {state['epoch']} epochs done, step {state['global_step']}")
        return state["epoch"], state["global_step"], state.get("best_metric")

    def _check_resume(self, directory, state: dict) -> None:
        """Refuses to continue another run: a different method, keywords, classes, training data or setting.
        Settings that only change how the run is carried out (`RESUMABLE`) may change, and are logged."""
        # A key the checkpoint lacks (written by promptkit 0.1) cannot be compared.
        different = [f"{key}: checkpoint {state[key]!r}, now {value!r}"
                     for key, value in self._run.items() if key != "data" and key in state and state[key] != value]
        saved_data = state.get("data", self._run["data"])
        if saved_data != self._run["data"]:
            different.append(f"training data: checkpoint {saved_data.get('n')} images (fingerprint "
                             f"{str(saved_data.get('fingerprint'))[:12]}), now {self._run['data']['n']} images "
                             f"({self._run['data']['fingerprint'][:12]}); other images, split, shots or seed")
        saved, now = state.get("config", {}), json.loads(json.dumps(self.config.to_dict()))  # tuples as saved
        for key in sorted(saved.keys() | now.keys()):
            if saved.get(key) != now.get(key):
                if key in RESUMABLE:
                    self._log_line(f"resume: {key} changed from {saved.get(key)!r} to {now.get(key)!r}")
                else:
                    different.append(f"{key}: checkpoint {saved.get(key)!r}, now {now.get(key)!r}")
        if different:
            raise ValueError(f"cannot resume the run in {directory}: it was trained differently ("
                             + "; ".join(different) + "). Use the same settings, or start a new run in another "
                             f"output directory (only {', '.join(sorted(RESUMABLE))} may change on resume)")

    def _log_metrics(self, metrics: dict) -> None:
        self.history.append(metrics)
        if not distributed.is_main():
            return
        self._log_line(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if not self.out:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        path = self.out / "metrics.csv"
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
        if set(metrics) - set(columns):  # a new column (a loss term, validation): rewrite with the union
            columns += [k for k in metrics if k not in columns]
            atomic_write(path, lambda tmp: _write_csv(tmp, columns, rows + [metrics]))
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerow(metrics)
        writer = self._tensorboard()
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    writer.add_scalar(k, v, metrics["epoch"])
            writer.flush()

    def _tensorboard(self):
        if not hasattr(self, "_tb"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb = None
        return self._tb

    def _log_line(self, text: str) -> None:
        if not distributed.is_main():
            return
        if self.config.progress:
            tqdm.write(text)
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "train.log", "a") as f:
                f.write(text + "\n")
