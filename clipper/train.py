"""Training on one process or many (torchrun: DDP, gloo on CPU, nccl on GPU). What is trained
and how its loss is computed is the objective's (clipper.objectives); the trainer runs the loop.

    clipper train --preset fmnist-tiny --train-data data/shards/fmnist/train \
        --eval-data data/shards/fmnist/test --minutes 10 --out runs/fmnist
    torchrun --nproc_per_node 2 -m clipper train --preset fmnist-tiny ...   (`clipper train`'s arguments)

Only rank 0 logs, evaluates and writes checkpoints; `--resume` continues from the run folder's
latest complete checkpoint (model, optimizer, step, RNG, data position).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import write_config
from .data.pipeline import SkipLog, make_loader, training_dataset
from .distributed import peak_rss_mib, rank_and_world
from .errors import CheckpointError, ConfigError
from .evaluate import evaluate_task
from .finetune import mix_weights
from .io import write_json
from .model.clip import MAX_LOGIT_SCALE
from .objectives import OBJECTIVES
from .optim import learning_rate, make_optimizer, set_learning_rate
from .precision import autocast, native_bf16
from .progress import Progress
from .run_config import check_train_config
from .runs import RunDir
from .train_config import TrainConfig


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun/SLURM job if there is one (gloo on CPU, nccl on CUDA)."""
    rank, world = rank_and_world()
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world


SHORT_EPOCH = 64  # batches: a shorter epoch is stretched to this many when loader workers read it


def trained_classnames(cfg: TrainConfig) -> list[str] | None:
    """The labels of a labelled training set (else of the zero-shot eval set), kept in the model:
    the demo page offers them, and they say what the model was trained to tell apart."""
    from .data.shards import CLASSNAMES_FILE, read_set_lines

    for data in (cfg.train_data, cfg.eval_data if cfg.eval_task.startswith("zeroshot") else None):
        if data and (names := read_set_lines(data, CLASSNAMES_FILE)):
            return names
    return None


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | os.PathLike, resume: bool = False):
        self.cfg = check_train_config(cfg)
        self.device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.run = RunDir(out)
        self._autocast = functools.partial(autocast, cfg.precision, self.device)
        if cfg.precision == "bf16" and not native_bf16(self.device) and self.is_main:
            print("precision bf16: this CPU has no native bf16 matmul (AVX512-BF16/AMX), training in fp32",
                  file=sys.stderr)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        random.seed(cfg.seed + self.rank)

        self.objective = OBJECTIVES[cfg.objective](cfg)
        self.model = self.objective.build_model().to(self.device)
        self.model.config.classnames = trained_classnames(cfg) or self.model.config.classnames
        self._deferred = self.objective.deferred(self.model)  # locked until cfg.unlock_step
        self.optimizer = make_optimizer(self.model, cfg, self._deferred)
        self.data = training_dataset(cfg, self.model.config, self.rank, self.world,
                                     self.objective.caption_tokenizer(self.model))
        if self.data.num_samples < cfg.batch_size * self.world:  # else one batch holds copies of a pair
            batch = max(cfg.accum_freq, self.data.num_samples // self.world // cfg.accum_freq * cfg.accum_freq)
            self._notice(f"batch_size {cfg.batch_size}: the training set holds {self.data.num_samples} pairs; "
                         f"batches of {batch} per rank, so that no pair is its own negative")
            self.cfg = cfg = dataclasses.replace(cfg, batch_size=batch)
            self.data = training_dataset(cfg, self.model.config, self.rank, self.world,
                                         self.objective.caption_tokenizer(self.model))
        if cfg.workers and cfg.epochs is None and max(self.data.batches_per_epoch(), cfg.min_epoch_batches) < SHORT_EPOCH:
            # loader workers start again every epoch: a small set would wait for them every step or two
            self._notice(f"min_epoch_batches {SHORT_EPOCH}: an epoch of {self.data.batches_per_epoch()} batch(es) "
                         "is read several times over, so that the loader's workers do not restart every step")
            self.cfg = cfg = dataclasses.replace(cfg, min_epoch_batches=SHORT_EPOCH)
            self.data = training_dataset(cfg, self.model.config, self.rank, self.world,
                                         self.objective.caption_tokenizer(self.model))
        self.loader = make_loader(self.data, cfg.workers)
        self.skips = SkipLog()
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.elapsed = 0.0  # training wall time, carried over resumes
        if resume:
            self._resume()
        elif self.run.latest_checkpoint() is not None:  # every rank sees the folder, so all stop alike
            raise ConfigError(f"{self.run.path}: holds checkpoints already; pass --resume to continue that run "
                              "or choose another --out")
        self._unlock_if_due()
        self.train_model = self._wrap()
        self.total_steps = cfg.steps
        if self.total_steps is None and cfg.epochs is not None:
            self.total_steps = math.ceil(cfg.epochs * self.data.batches_per_epoch())
        # a resumed run has had the evaluations its progress passed
        self._evals_done = min(cfg.evals - 1, math.floor(self._progress() * cfg.evals + 1e-9)) if cfg.evals > 1 else 0
        if self.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.run.path / "config.json")

    def _wrap(self) -> torch.nn.Module:
        """The module the steps run: the objective's, compiled and DDP-wrapped as configured (DDP
        reduces the gradients of the parameters that train when it is built)."""
        module = self.objective.module(self.model)
        if self.cfg.compile:
            module = torch.compile(module, dynamic=True)
        return DistributedDataParallel(module) if self.world > 1 else module

    def _unlock_if_due(self) -> bool:
        """At `unlock_step`, the locked towers start training (True when that happened now)."""
        if not self._deferred or self.step < self.cfg.unlock_step:
            return False
        for part in self._deferred:
            part.requires_grad_(True)
        self._deferred = []
        self._notice(f"step {self.step}: the locked tower(s) train from here on (unlock_step)")
        return True

    def _notice(self, text: str) -> None:
        if self.is_main:
            print(f"train: {text}", file=sys.stderr)

    def _finished(self) -> bool:
        """The run's budget (steps, epochs or minutes) is spent (not merely this job's stop_after)."""
        return self.total_steps is not None and self.step >= self.total_steps or (
            bool(self.cfg.minutes) and self.elapsed >= 60 * self.cfg.minutes)

    # --- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "samples": self.samples, "elapsed": self.elapsed,
                "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
                "batch_size": self.cfg.batch_size, "world": self.world}

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies; damaged newer ones are passed over
        (and named). One of another architecture or batch is refused: the data position and the
        optimizer state would not mean what they meant."""
        found = self.run.complete_checkpoints()
        if not found:
            raise ConfigError(f"{self.run.path}: --resume, but no complete checkpoint in {self.run.checkpoints}")
        for path in reversed(found):
            try:
                model, state = RunDir.load_checkpoint(path)
                break
            except CheckpointError as e:
                if self.is_main:
                    print(f"resume: passing over {path.name}: {e}", file=sys.stderr)
        else:
            raise CheckpointError(f"{self.run.checkpoints}: no checkpoint verifies ({len(found)} tried)")
        theirs, ours = _architecture(model.config), _architecture(self.model.config)
        if theirs != ours:
            raise ConfigError(f"{path}: holds a model of another architecture than this run's config "
                              f"({_first_difference(theirs, ours)}); "
                              "resume with the settings it was trained with, or start a new --out")
        for name, now in (("batch_size", self.cfg.batch_size), ("world", self.world)):
            if state.get(name, now) != now:
                raise ConfigError(f"{path}: was trained with {name} {state[name]}, this run has {now}; "
                                  "resume with the same, or start a new --out")
        self.model.load_state_dict(model.state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path}: its optimizer state does not fit this run's trainable parameters ({e})") \
                from None
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.samples, self.elapsed = state["samples"], state["elapsed"]
        torch.set_rng_state(state["rng_torch"])
        random.setstate(state["rng_python"])
        if self.is_main:
            self.run.remove_partial()
            self.run.truncate_metrics(self.step)  # the steps after it run (and are logged) again
            print(f"resumed from {path} (step {self.step}, epoch {self.epoch}, batch {self.batch_in_epoch})",
                  file=sys.stderr, flush=True)

    def save_checkpoint(self) -> None:
        if self.is_main:
            self.run.save_checkpoint(self.step, self.model, self._state(), self.cfg.keep_checkpoints)

    # --- one optimisation step ------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, texts: torch.Tensor,
                   groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward, backward and update on one batch (`groups`: its view-group ids, if any)."""
        self.train_model.train()
        losses = self.objective.forward_backward(self.train_model, images, texts, self._autocast, groups)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # keep the stored temperature where its clamp still passes gradients
            self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return losses

    # --- the loop -------------------------------------------------------------------------------
    def _progress(self) -> float:
        parts = []
        if self.total_steps:
            parts.append(self.step / self.total_steps)
        if self.cfg.minutes:
            parts.append(self.elapsed / (60 * self.cfg.minutes))
        return max(parts)

    def _done(self, steps_this_run: int) -> bool:
        if self.total_steps is not None and self.step >= self.total_steps:
            return True
        if self.cfg.stop_after is not None and steps_this_run >= self.cfg.stop_after:
            return True
        return bool(self.cfg.minutes) and self.elapsed >= 60 * self.cfg.minutes

    def _eval_due(self) -> bool:
        """One of the run's `evals` is due: the budget passed its next fraction (the last is the final
        evaluation, at the end). Counted from the progress, so a resumed run goes on where it was."""
        n = self.cfg.evals
        if n < 2 or self._finished():
            return False
        due = min(n - 1, math.floor(self._progress() * n + 1e-9))
        if due > self._evals_done:
            self._evals_done = due
            return True
        return False

    def _sync_elapsed(self) -> None:
        """Every rank follows rank 0's clock, so all agree on the learning rate and on stopping."""
        if self.world > 1 and self.cfg.minutes:
            t = torch.tensor([self.elapsed], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(t, 0)
            self.elapsed = float(t)

    def _log(self, losses: dict[str, torch.Tensor], lr: float, rate: float) -> None:
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        if not self.is_main:
            return
        record = {"step": self.step, "epoch": self.epoch, "samples": self.samples, "elapsed": round(self.elapsed, 2),
                  "lr": lr, "logit_scale": self.model.logit_scale.detach().exp().item(), "samples_per_s": round(rate, 1),
                  "peak_rss_mib": round(peak_rss_mib(), 1),
                  **{k: float(v) for k, v in zip(losses, values)}}
        if self.model.logit_bias is not None:
            record["logit_bias"] = self.model.logit_bias.detach().item()
        if self.device.type == "cuda":
            record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        self.run.log(record)

    def evaluate(self) -> dict[str, float] | None:
        """The configured evaluation on rank 0 (None elsewhere or when there is none)."""
        if not self.is_main or self.cfg.eval_task == "none":
            return None
        return evaluate_task(self.model, self.cfg.eval_task, self.cfg.eval_data, batch_size=512,
                             allow_pipe=self.cfg.allow_pipe or None)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        steps_this_run = 0
        bar = Progress(self.total_steps, "train", "step", initial=self.step, disable=not self.is_main,
                       fraction=self._progress)
        global_batch = cfg.batch_size * self.world
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # SLURM preemption: checkpoint, then leave
        try:
            while not self._done(steps_this_run):
                self.data.set_epoch(self.epoch)
                batches = iter(self.loader)
                for _ in range(self.batch_in_epoch):  # resume mid-epoch: replay the stream up to the position
                    next(batches)
                t_log, steps_log = time.perf_counter(), 0
                t_mark = t_log  # the budget counts the loop's wall time (data, steps, checkpoints), not evals
                for batch in batches:
                    self.skips.add(batch)
                    if self._unlock_if_due():
                        self.train_model = self._wrap()
                    lr = learning_rate(cfg, self.step, self._progress())
                    set_learning_rate(self.optimizer, lr)
                    groups = batch.get("group")
                    losses = self.train_step(batch["image"].to(self.device, non_blocking=True),
                                             batch["text"].to(self.device, non_blocking=True),
                                             None if groups is None else groups.to(self.device))
                    self.step += 1
                    self.batch_in_epoch += 1
                    steps_this_run += 1
                    steps_log += 1
                    self.samples += global_batch
                    now = time.perf_counter()
                    self.elapsed, t_mark = self.elapsed + now - t_mark, now
                    self._sync_elapsed()
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self._finished():  # a short run logs its end too
                        rate = steps_log * global_batch / (time.perf_counter() - t_log)
                        self._log(losses, lr, rate)
                        bar.set_postfix(loss=f"{losses['loss'].item():.3f}", samples_s=f"{rate:.0f}")
                        t_log, steps_log = time.perf_counter(), 0
                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or self._eval_due():
                        self._record_eval()
                        t_mark = time.perf_counter()  # the evaluation is neither training time nor rate
                        t_log, steps_log = t_mark, 0
                    if self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._done(steps_this_run):
                        break
                else:
                    if self.is_main and self.skips.skipped:  # a line per epoch only when it has news
                        bar.write(f"epoch {self.epoch}: {self.skips.summary()}")
                    self.skips.clear()
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        except KeyboardInterrupt:
            self.save_checkpoint()
            if self.is_main:
                bar.write(f"interrupted at step {self.step}: checkpoint written; continue with --resume")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
        self.save_checkpoint()
        summary = {"step": self.step, "epoch": self.epoch, "samples": self.samples,
                   "train_seconds": round(self.elapsed, 1),
                   "samples_per_s": round(self.samples / self.elapsed, 1) if self.elapsed else None,
                   "skipped": len(self.skips.skipped)}
        if self.objective.features is not None:  # this run's share of tower features found, not computed
            summary["tower_features"] = {"found": self.objective.features.hits,
                                         "computed": self.objective.features.misses}
        if self.is_main and self._finished():
            self.objective.finish(self.model)
            if cfg.init and cfg.wise_ft < 1:
                mix_weights(self.model, self.objective.initial_weights(), cfg.wise_ft)
            self.model.save(self.run.path / "model")
            summary["eval"] = self._record_eval()
            self.run.plot()
            write_json(self.run.path / "summary.json", summary)
        return summary

    def _record_eval(self) -> dict[str, float] | None:
        t0 = time.perf_counter()
        metrics = self.evaluate()
        if metrics is not None:
            self.run.log({"step": self.step, "samples": self.samples, "elapsed": round(self.elapsed, 2),
                          "eval_seconds": round(time.perf_counter() - t0, 2), "eval": metrics})
            self.run.plot()
            line = f"step {self.step}: {self.cfg.eval_task} " + \
                ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
            print(line, file=sys.stderr, flush=True)
        return metrics


def _architecture(config) -> dict:
    """The config less where a transformers text tower's or a decoder's language model's files are
    read from (a checkpoint names its own copy of them) and whether its weights came from there
    (they are in the checkpoint)."""
    out = config.to_dict()
    if config.text.kind == "hf":
        out["text"] = {k: v for k, v in out["text"].items() if k not in ("hf_model", "tokenizer", "hf_pretrained")}
    if config.decoder is not None:
        out["decoder"] = {k: v for k, v in out["decoder"].items() if k not in ("language_model", "datastore")}
    return out


def _first_difference(a: dict, b: dict, where: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{where}{key}.")
            return f"{where}{key}: {a.get(key)!r} there, {b.get(key)!r} here"
    return "no field differs"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt

