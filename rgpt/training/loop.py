"""The training loop: epochs of batches, weighted accumulation, clipping, Adam, validation, early stopping
with rollback, checkpoints, exact resume, and clean stops on Ctrl-C / SIGTERM.

The loop is handed a stage (rgpt/training/stage.py) and asks it for its data, its trainable parameters,
its forward/backward, its validation and its metrics; it never asks which stage it is.

At ~480 lines this module is longer than the others, on purpose: it is one object whose fields are the run's
position (epoch, batch, step, best loss, patience), and every method reads and moves them. Read top to
bottom, it is the run's steps in order; what is not the loop lives beside it (stage, start, glimpses,
monitor, distributed).

A step takes `grad_accum` micro-batches from the epoch's fixed order. Under torch.distributed each rank
computes its share of those micro-batches and the gradients are summed, so a step is the same whatever
the number of processes, and a run can resume with a different one.
"""

import math
import signal
import time

import numpy as np
import torch

from rgpt.data.tokenizer import PAD_ID
from rgpt.nn.optim import Adam, clip_coef
from rgpt.nn.schedule import learning_rate
from rgpt.runtime import checkpoint as ckpt
from rgpt.training.diagnostics import StepProbe
from rgpt.training.distributed import Dist
from rgpt.training.glimpses import Glimpses
from rgpt.training.monitor import Monitor, Timers, estimate_eta, format_seconds, peak_memory_mb, ppl
from rgpt.training.settings import RunConfig
from rgpt.training.stage import Context
from rgpt.training.start import resolve_start, rng_state, set_rng_state


class Stop(Exception):
    """Training cannot go on (e.g. too many non-finite steps); the message says why."""


class Trainer:
    def __init__(self, cfg: RunConfig, stage, device, dist: Dist | None = None, log=print):
        """stage: the Stage class to train (rgpt.stages.STAGES[cfg.stage])."""
        self.cfg, self.device, self.dist = cfg, device, dist or Dist()
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        torch.manual_seed(cfg.seed)
        # rank 0 first: it builds (or finds) the vocabulary and sets old checkpoints aside alone
        start = self.dist.first_then_rest(
            lambda: resolve_start(cfg, stage, device, torch.float32, log=self.log), "vocabulary"
        )
        self.model, self.tok = start.model, start.tokenizer
        with self.model.store.write() as weights:  # every rank starts from rank 0's weights, bit for bit
            self.dist.broadcast_(weights)
        self.timers = Timers(device)
        self.stage = stage(
            Context(
                cfg, self.model, self.tok, device, self.dist, self.log, self.timers, start.source, start.state
            )
        )
        self.store = self.stage.trainable()  # what Adam updates: the model's store, or the stage's own
        if self.store is not self.model.store:
            with self.store.write() as weights:
                self.dist.broadcast_(weights)
        self.batches = self.stage.data()
        t, ps = cfg.train, self.store.params
        frozen = [n for n in ps if ".attn." in n] if t.freeze_attn else []
        # a frozen weight must not decay either
        decay = [n for n, p in ps.items() if p.dim() >= 2 and n not in frozen] if t.weight_decay else []
        self.opt = Adam(
            self.store,
            betas=(t.beta1, t.beta2),
            eps=t.eps,
            weight_decay=t.weight_decay,
            decay=decay,
            frozen=frozen,
        )
        # where the run stands; all of it goes into every checkpoint's state.json
        self.epoch, self.pos, self.step = 0, 0, 0  # pos: micro-batches of `epoch` already consumed
        self.best, self.bad_epochs, self.elapsed = math.inf, 0, 0.0
        # this epoch's token-weighted loss sum and its tokens; all tokens seen by the run
        self.ep_loss, self.ep_tokens, self.tokens = 0.0, 0, 0
        self.history = []  # per-epoch summaries
        if start.state is not None:
            self._restore(start.state, start.source)
        self.best_params = self._best_params(start.source) if math.isfinite(self.best) else None
        self.stop_reason = None
        # a Ctrl-C / SIGTERM lands in _pending; _signal is set once every rank knows (see train_step)
        self._signal = self._pending = None
        self._deadline, self._time_up = math.inf, False  # max_minutes, by rank 0's clock
        self._eta = None  # the last step's ETA (monitor.Eta)
        self._probe = None  # this step's diagnostics (monitor.diagnostics), when it has them
        self.glimpses = Glimpses(self.model, self.tok, cfg.monitor, self.stage.chat_template, self.log)

    # ---- resume -------------------------------------------------------------------------------------
    def _restore(self, st: dict, path):
        self.opt.load_state_dict(ckpt.load_tensors(path, ckpt.OPTIM, device=self.device))
        self.epoch, self.pos, self.step = st["epoch"], st["pos"], st["step"]
        self.best, self.bad_epochs = st["best"], st["bad_epochs"]
        self.elapsed, self.history = st["elapsed"], st["history"]
        self.ep_loss, self.ep_tokens, self.tokens = st["ep_loss"], st["ep_tokens"], st["tokens"]
        set_rng_state(self.model, st["rng"], log=self.log)
        self.log(f"resumed at epoch {self.epoch + 1}, batch {self.pos}, step {self.step}")

    def _best_params(self, source) -> torch.Tensor:
        """What early stopping rolls back to: after a resume, the weights of the `best` checkpoint saved
        beside the one resumed (not the resumed weights); the current weights when there is none."""
        best = ckpt.find(source.parent, "best", warn=self.log) if source is not None else None
        if best is None or ckpt.read_state(best).get("monitor_value") != self.best:
            return self.store.snapshot()
        current = self.store.snapshot()
        self.stage.load_trainable(best)
        weights = self.store.snapshot()
        self.store.restore(current)
        return weights

    def _state(self, **extra) -> dict:
        return {
            "stage": self.cfg.stage,
            "epoch": self.epoch,
            "pos": self.pos,
            "step": self.step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "monitor": self.cfg.train.monitor,
            "elapsed": self.elapsed,
            "ep_loss": self.ep_loss,
            "ep_tokens": self.ep_tokens,
            "tokens": self.tokens,
            "history": self.history,
            "lr": self.lr(),
            "rng": rng_state(self.model),
            "world_size": self.dist.world,
            "data_files": [str(f) for f in self.cfg.data.files],
            **self.stage.state(),
            **extra,
        }

    def lr(self) -> float:
        return learning_rate(self.cfg.train, self.step, self.epoch)

    # ---- one optimizer step -----------------------------------------------------------------------------
    def train_step(self, group) -> tuple[float, float, int]:
        """Forward/backward this rank's share of the micro-batches in `group`, then one Adam step.

        Returns (loss, grad norm, tokens): the token-weighted mean loss of the whole group across ranks.
        """
        m, timers, d = self.model, self.timers, self.dist
        mon = self.cfg.monitor
        inside = self.stage.reads_gpt_loss  # diagnostics and the gradient check read the GPT's loss
        if inside and d.is_main and self._due(mon.gradcheck_every):
            with timers("gradcheck"):
                self.glimpses.gradcheck(group[0], self.step, self.monitor)
        probe = self._probe = (
            StepProbe()
            if inside and d.is_main and mon.diagnostics and self._due(mon.diagnostics_every)
            else None
        )
        n_total = self.stage.weight(group)
        # (stop requested, time up, loss sum, the stage's other sums) travel in one all-reduce, so every rank
        # leaves the loop after the same step; a rank that stopped alone would leave the others waiting
        stats = torch.zeros(2 + self.stage.n_sums, dtype=torch.float64, device=self.device)
        self.store.zero_grad()
        for j in range(d.rank, len(group), d.world):  # micro-batches rank, rank + world, ... of the group
            b = group[j]
            # dropout masks follow the micro-batch's place in the epoch, not the rank that computes it
            m.generator.manual_seed(self._dropout_seed(self.pos + j))
            with timers("data"):
                b = b.to(self.device)
            # diagnostics read the activations of this rank's first micro-batch
            stats[2:] += self.stage.forward_backward(b, n_total, probe if j == d.rank else None)
        stats[0] = self._pending is not None
        stats[1] = d.is_main and time.perf_counter() >= self._deadline
        with timers("optimizer"):
            d.all_reduce_sum(
                self.store.grad, stats
            )  # the gradient: the single-process one of the whole group
            if probe is not None:
                with timers("diagnostics"):
                    probe.gradients(m)
            norm, clip = clip_coef(self.store.grad, self.cfg.train.clip_norm)  # applied inside Adam's pass
            stop, time_up, loss_sum, *self._sums = torch.cat([stats, norm.double().view(1)]).tolist()
            norm_value = self._sums.pop()
            loss_value = loss_sum / n_total  # the line above is the one host sync per step
            if stop:
                self._signal = self._pending or signal.SIGTERM  # SIGTERM: another rank was signalled
                self.log(f"\n{signal.Signals(self._signal).name} received: saving `last` after this step")
            self._time_up = bool(time_up)
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                self.opt.step(self.lr(), grad_scale=clip)  # also refreshes the bf16 working copy
            self.step += 1
        if probe is not None:
            with timers("diagnostics"):
                probe.updates(m)
        return loss_value, norm_value, sum(int((b.idx != PAD_ID).sum()) for b in group)

    def _due(self, every: int | None) -> bool:
        """Whether the step about to be taken is one of every `every` (None: never)."""
        return every is not None and (self.step + 1) % every == 0

    def _dropout_seed(self, index: int) -> int:
        """Seed of the dropout masks of micro-batch `index` of this epoch: the same for any world size."""
        key = np.random.SeedSequence([self.cfg.seed, self.epoch, index])
        return int(key.generate_state(1, np.uint64)[0] >> 1)

    def validate(self) -> float:
        """The stage's validation loss, in eval mode (reduced across ranks)."""
        self.model.eval()
        with self.timers("validation"):
            loss = self.stage.validate()
        self.model.train()
        return loss

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, kind: str, **extra):
        if not self.dist.is_main or self.cfg.checkpoint.strategy == "none":
            return None
        with self.timers("checkpoint"):
            path = ckpt.save(
                self.cfg.run_dir / "checkpoints",
                kind,
                self.step,
                self.model,
                self.tok,
                self._state(**extra),
                optimizer=self.opt,
                adapters=self.stage.adapters,
            )
            c = self.cfg.checkpoint
            if kind == "best":
                ckpt.prune(path.parent, "best", c.keep_best)
            elif kind == "last":  # only this one: a newer but damaged or abandoned `last` must not outrank it
                ckpt.prune(path.parent, "last", 1, current=path)
            elif kind == "epoch":
                ckpt.prune(path.parent, "epoch", c.keep)
        return path

    # ---- the run ---------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        """Only records the signal: logging here could re-enter a write the main thread is in the middle of."""
        if self._pending is not None:  # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self._pending = signum

    def _out_of_budget(self, fresh: bool = False) -> str | None:
        """max_steps, max_tokens, or max_minutes by rank 0's clock (ranks' clocks differ, their decision must not):
        `fresh` asks rank 0 now (a collective); otherwise its answer from the last step's all-reduce counts."""
        t = self.cfg.train
        if t.max_steps is not None and self.step >= t.max_steps:
            return f"reached max_steps={t.max_steps}"
        if t.max_tokens is not None and self.tokens >= t.max_tokens:
            return f"reached max_tokens={t.max_tokens}"
        if t.max_minutes is not None and fresh:
            self._time_up = self.dist.any(self.dist.is_main and time.perf_counter() >= self._deadline)
        if t.max_minutes is not None and self._time_up:
            return f"reached max_minutes={t.max_minutes}"
        return None

    def run(self) -> dict:
        cfg, t, m = self.cfg, self.cfg.train, self.model
        self.monitor = Monitor(
            cfg.run_dir,
            enabled=self.dist.is_main,
            progress=cfg.monitor.progress,
            purge_step=self.step + 1,  # events up to this step are the resumed checkpoint's past: keep them
            log=self.log,
        )
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        t0 = time.perf_counter()
        if t.max_minutes is not None:
            self._deadline = t0 + 60 * t.max_minutes - self.elapsed
        # this process's pace, for the ETA and tokens/s: its start, micro-batches and tokens done since
        self._session = {"t0": t0, "start": self._batch_index(), "tokens": 0, "bad_in_a_row": 0}
        per_epoch = -(-len(self.batches) // t.grad_accum)  # optimizer steps per epoch
        self.log(
            f"{cfg.stage}: {m.num_params():,} parameters ({self.store.numel():,} trained), {self.stage.train_size} training / "
            f"{self.stage.val_size} validation windows, {len(self.batches)} micro-batches per epoch, "
            f"{per_epoch} steps per epoch, device {self.device}, precision {cfg.precision}"
        )
        m.train()
        try:
            while self.epoch < t.max_epochs and self.stop_reason is None:
                self.stop_reason = self._out_of_budget(fresh=True)
                if self.stop_reason:
                    break
                ep_t0, ep_tokens = time.perf_counter(), self._session["tokens"]
                self._train_epoch()
                if self._signal is not None:
                    break
                if self.stop_reason and self.pos < len(self.batches):
                    break  # a budget ran out mid-epoch: _finish saves `last` with the position
                rate = (self._session["tokens"] - ep_tokens) / max(time.perf_counter() - ep_t0, 1e-9)
                # an epoch whose every step was skipped has no train loss (not 0.0, which would look best)
                self._end_epoch(self.ep_loss / self.ep_tokens if self.ep_tokens else math.nan, t0, rate)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self._finish(t0)

    def _batch_index(self) -> int:
        """Micro-batches of the run so far, counted across epochs."""
        return self.epoch * len(self.batches) + self.pos

    def _train_epoch(self) -> None:
        """Steps over the rest of this epoch, until it ends, a budget runs out or a signal arrives."""
        t, session = self.cfg.train, self._session
        self.monitor.start_epoch(self.epoch, len(self.batches), self.pos)
        group, it = [], self.batches.epoch(self.epoch, start=self.pos)
        while True:
            with self.timers("data"):
                b = next(it, None)
            if b is not None:
                group.append(b)
                if len(group) < t.grad_accum:
                    continue
            if not group:
                return
            loss, norm, ntok = self.train_step(group)
            self.pos += len(group)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                session["bad_in_a_row"] += 1
                self.log(f"warning: non-finite loss/gradient at step {self.step} (update skipped)")
                if session["bad_in_a_row"] >= t.max_bad_steps:
                    raise Stop(
                        f"{session['bad_in_a_row']} non-finite steps in a row; stopping (try a lower train.lr)"
                    )
            else:
                session["bad_in_a_row"] = 0
                n_targets = self.stage.weight(group)
                self.ep_loss += loss * n_targets
                self.ep_tokens += n_targets
            session["tokens"] += ntok
            self.tokens += ntok
            group = []
            self._log_step(loss, norm)
            if t.eval_every and self.step % t.eval_every == 0:
                self._evaluate_mid_epoch()  # may decide early stopping
            self.stop_reason = self.stop_reason or self._out_of_budget()
            if self._signal is not None or self.stop_reason:
                return

    def _log_step(self, loss: float, norm: float) -> None:
        """The step's metrics, once, for every sink (TensorBoard and the progress bar), with the ETA."""
        t, session = self.cfg.train, self._session
        spent = time.perf_counter() - session["t0"]
        rate = session["tokens"] / max(spent, 1e-9)
        eta = estimate_eta(
            t,
            epoch=self.epoch,
            pos=self.pos,
            batches=len(self.batches),
            step=self.step,
            tokens=self.tokens,
            sec_per_batch=spent / max(self._batch_index() - session["start"], 1),
            eval_interval=t.eval_every * t.grad_accum if t.eval_every else None,
            to_next_eval=(t.eval_every - self.step % t.eval_every) * t.grad_accum if t.eval_every else None,
            tokens_per_sec=rate,
            seconds_left=self._deadline - time.perf_counter(),
            bad_epochs=self.bad_epochs,
        )
        metrics = {
            **self.stage.step_metrics(loss, self._sums),
            "train/lr": self.lr(),
            "train/grad_norm": norm,
            "train/tokens_per_sec": rate,
            "train/eta_epoch_sec": eta.epoch,
            "train/eta_sec": eta.run,  # to the budget that ends the run (eta.budget)
        }
        if eta.early_stop is not None:
            metrics["train/eta_early_stop_sec"] = eta.early_stop
        if self._probe is not None:  # this step's diagnostics
            metrics.update(self._probe.scalars)
            with self.timers("diagnostics"):
                self.monitor.histograms(self.step, self._probe.histograms)
            self._probe = None
        self.monitor.step(self.step, metrics, t.grad_accum, eta)
        self._eta = eta
        every = self.cfg.monitor.attention_every
        if every is not None and self.step % every == 0 and self.dist.is_main:
            with self.timers("attention images"):
                self.glimpses.attention_images(self.step, self.monitor)

    def _evaluate(self, train_loss: float) -> tuple[float, bool]:
        """Validate, track the best model and early stopping, log to TensorBoard: at every epoch's end, or
        every train.eval_every steps. Returns (validation loss, whether the monitored loss improved)."""
        t = self.cfg.train
        val_loss = self.validate()
        value = val_loss if t.monitor == "val_loss" else train_loss
        improved = math.isfinite(value) and value < self.best - t.min_delta
        if improved:
            self.best, self.bad_epochs = value, 0
            self.best_params = self.store.snapshot()
        else:
            self.bad_epochs += 1  # evaluations without improvement (epochs unless eval_every is set)
        self.history.append(
            {
                "epoch": self.epoch + 1,
                "step": self.step,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": self.lr(),
            }
        )
        self.monitor.scalars(self.step, self.stage.val_metrics(val_loss))
        self.monitor.scalars(self.step, {f"time/{k}_sec": v for k, v in self.timers.total.items()})
        if self.dist.is_main:
            self.monitor.text("sample", self.glimpses.sample(), self.step)
            for tag, text in self.stage.texts().items():
                self.monitor.text(tag, text, self.step)
            if self._eta is not None:  # which budget ends the run, in words
                self.monitor.text("eta", self._eta.text(), self.step)
        if self.bad_epochs >= t.patience:
            every = f"evaluations (every {t.eval_every} steps)" if t.eval_every else "epochs"
            self.stop_reason = f"early stopping: {t.monitor} did not improve for {t.patience} {every}"
        return val_loss, improved

    def _save_progress(self, improved: bool) -> None:
        """After an evaluation or an epoch: `last`, and `best` if the monitored loss improved (or, with the
        periodic strategy, a checkpoint every `every` epochs)."""
        c = self.cfg.checkpoint
        if c.strategy == "best_and_last":
            self.save("last")
            if improved:
                self.save("best", monitor_value=self.best)
        elif c.strategy == "periodic" and self.pos == 0 and self.epoch % c.every == 0:
            self.save("epoch")

    def _evaluate_mid_epoch(self) -> None:
        """train.eval_every: evaluate, log and checkpoint every N steps (an epoch of real text is long)."""
        train_loss = self.ep_loss / self.ep_tokens if self.ep_tokens else math.nan
        val_loss, improved = self._evaluate(train_loss)
        self.log(
            f"step {self.step:6d} | epoch {self.epoch + 1} batch {self.pos}/{len(self.batches)} "
            f"| train loss {train_loss:.4f} | val loss {val_loss:.4f} ppl {ppl(val_loss):8.2f} "
            f"| lr {self.lr():.2e}{'  *best*' if improved else ''}"
        )
        self._save_progress(improved)

    def _end_epoch(self, train_loss: float, t0: float, tokens_per_sec: float) -> None:
        """The epoch is complete: evaluate (unless eval_every does it by steps), log and checkpoint."""
        t = self.cfg.train
        val_loss, improved = (math.nan, False) if t.eval_every else self._evaluate(train_loss)
        self.epoch, self.pos, self.ep_loss, self.ep_tokens = self.epoch + 1, 0, 0.0, 0
        elapsed = self.elapsed + time.perf_counter() - t0
        val = "" if t.eval_every else f"| val loss {val_loss:.4f} ppl {ppl(val_loss):8.2f} "
        self.monitor.end_epoch(
            f"epoch {self.epoch:3d} | step {self.step:6d} | train loss {train_loss:.4f} ppl {ppl(train_loss):8.2f} "
            f"{val}| lr {self.lr():.2e} | {tokens_per_sec:.0f} tok/s | {format_seconds(elapsed)}"
            f"{'  *best*' if improved else ''}"
        )
        self._save_progress(improved)

    def _finish(self, t0: float) -> dict:
        cfg = self.cfg
        self.elapsed += time.perf_counter() - t0
        self.monitor.close()
        if self._signal is not None:  # Ctrl-C / SIGTERM: keep exactly where we are
            path = self.save("last")
            self.log(
                f"stopped by {signal.Signals(self._signal).name}; "
                + (f"saved {path}; continue with resume=true" if path else "no checkpoint (strategy none)")
            )
            return {"interrupted": True, "checkpoint": str(path) if path else None}
        reason = self.stop_reason or f"reached max_epochs={cfg.train.max_epochs}"
        if self.pos:  # stopped mid-epoch (max_steps / max_minutes): resume=true continues from here exactly
            self.save("last")
        if (
            self.stop_reason
            and self.stop_reason.startswith("early stopping")
            and self.best_params is not None
        ):
            self.store.restore(self.best_params)  # roll back to the best model before the final save
            reason += f"; rolled back to the best model ({cfg.train.monitor} {self.best:.4f})"
        path = self.save("final")
        self.log(f"done: {reason}.")
        self._report()
        return {
            "interrupted": False,
            "reason": reason,
            "best": self.best,
            "checkpoint": str(path) if path else None,
            "history": self.history,
            "step": self.step,
        }

    def _report(self) -> None:
        total = self.timers.total
        rows = "  ".join(f"{k} {v:.1f}s" for k, v in sorted(total.items(), key=lambda kv: -kv[1]))
        self.log(
            f"time: {rows} | total {format_seconds(self.elapsed)} | peak memory "
            f"{peak_memory_mb(self.device):.0f} MB | {self.tokens / max(self.elapsed, 1e-9):.0f} tokens/s"
        )
