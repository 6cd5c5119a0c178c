"""One training run: its folder (`minirlhf.train.folder.RunFolder`: the lock, the record, the log),
its checkpoints and resuming, its steps, and the step itself (`Run.update`: backward, the finiteness
checks, clipping, the optimizers). Every trainer follows the same lines:

    def sft(cfg):
        check_common(cfg)
        with Run(cfg, "sft") as run:             # lock out_dir, clean *.tmp, compare settings
            return run.result if run.finished else _train(cfg, run)

    def _train(cfg, run):
        ...the data, the model, the optimizer, the RNGs
        start = run.restore(model, optimizer, rngs={"sampling": rng})    # 0, or the last checkpoint's step
        for step in run.steps(start):            # start+1 .. max_steps; Ctrl-C stops after a whole step
            loss_t = ...                         # a scalar Tensor
            loss, grad_norm = run.update(loss_t) # backward, clip, step; DivergenceError if not finite
                                                 # (several models: run.update(loss_t, models=...,
                                                 #  optimizers=...), as PPO's policy and value)
            run.log(step, {"loss": loss, "grad_norm": grad_norm})
            run.save_if_due(step)                # every ckpt_interval steps and at max_steps
        loss = run.last["loss"]                  # the last logged step (also right after a resume)
        return run.finish({"loss": loss}, f"loss {loss:.4f}")

The position in the data order is the step itself: `minirlhf.datasets.Minibatches` gives the batch of
any step from the seed alone, so a checkpoint needs only the model, the optimizer, the RNG states
(the model's dropout RNG is always included) and the step.

A run folder (``--out-dir``) holds one run:

    ckpt.npz        the last checkpoint: model, optimizer, RNG states, step (written atomically)
    metrics.jsonl   one JSON object per step, each step once (also after a resume), names as TRL's;
                    a NaN or infinite metric is null
    run.json        the stage, its settings and input files, and, once finished, its result
    .lock           the process that holds the folder

What a run guarantees, in every trainer:

* Running the same command again goes on from the last checkpoint, bit for bit: the data order
  comes from the seed and the step (`minirlhf.datasets.Minibatches`), the RNG states are saved.
  A finished run says so and does nothing; other settings or input files of other content in the
  same folder are refused unless ``--overwrite``. ``max_steps`` may change (a finished run goes on
  to more steps), and so may ``ckpt_interval``, ``device``, ``quiet`` and the folder's place.
* A second run in a folder in use refuses, naming the process; the lock of a dead process is taken
  over, and the ``*.tmp`` files of a save that was killed are removed.
* A NaN or infinite loss or gradient norm stops the run with one line (`DivergenceError`) before
  anything is saved: the last good checkpoint stays. A checkpoint with such weights is never written.
* Ctrl-C ends the step in progress, saves it, and the message says what to type to go on.
* Bad input is one line (`ConfigError`, `DataError`, ...), checked before any work starts; in
  particular ``--overwrite`` clears the folder only once the new run's data and model are loaded.
"""

import contextlib
import math
import signal
import threading
from dataclasses import asdict

from ..backend import get_array_module
from ..checkpoint import CheckpointError, non_finite, load_checkpoint, save_checkpoint
from .common import ConfigError
from .folder import RunFolder, command_line  # noqa: F401  (command_line: the CLI's)


class DivergenceError(RuntimeError):
    """A loss or a gradient norm that is NaN or infinite: the run stops before it can be saved."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, honoured after a whole step and its checkpoint; the message says how to go on."""


class Run:
    """The run of ``stage`` with config ``cfg`` in ``cfg.out_dir`` (see the module docstring).

    Opening it opens its `RunFolder` (the lock, ``run.json``): ``finished`` (with its ``result``)
    says a finished run of the same settings is there. `restore` loads the last checkpoint,
    `steps` counts the steps, `update` takes one, `log` and `save_if_due` record it, `finish` ends.
    """

    def __init__(self, cfg, stage):
        self.cfg, self.stage = cfg, stage
        self.max_steps = cfg.max_steps
        self.folder = RunFolder(cfg, stage)
        self.ckpt_path = self.folder.ckpt_path
        self.finished, self.result = self.folder.finished, self.folder.result
        self.model = self.optimizer = None
        self.also, self.rngs, self.saved_step, self.step = {}, {}, None, 0

    @property
    def last(self):
        """The last logged row (also right after a resume)."""
        return self.folder.last

    def log(self, step, metrics):
        """Write ``{"step", **metrics, "time"}`` as one line of ``metrics.jsonl`` (`RunFolder.log`)."""
        self.folder.log(step, metrics)

    def print(self, text):
        """A message that does not break the progress bar (nothing with ``quiet``)."""
        self.folder.print(text)

    def finish(self, result, summary=""):
        """Mark the run finished with ``result`` (`RunFolder.finish`); returns the full result."""
        self.result = self.folder.finish(result, summary)
        return self.result

    # ----- resuming ----------------------------------------------------------------------------

    def restore(self, model, optimizer, rngs=None, also=None):
        """Register what a checkpoint holds and load the last one, if any; returns its step (or 0).

        ``rngs``: named ``numpy.random.Generator`` s, restored in place (``model.dropout_rng`` is
        added as "dropout"). ``also``: more named things with ``state_dict``/``load_state_dict``
        (a value model, its optimizer). ``metrics.jsonl`` is cut back to the steps the checkpoint
        has seen.
        """
        self.folder.clear()
        self.model, self.optimizer = model, optimizer
        self.also = dict(also or {})
        self.rngs = dict(rngs or {})
        if getattr(model, "dropout_rng", None) is not None:
            self.rngs["dropout"] = model.dropout_rng
        start = 0
        if self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path, model, optimizer)
            start = self.saved_step = int(ckpt["step"])
            saved = ckpt["rng_state"] or {}
            for name, rng in self.rngs.items():
                if name not in saved:
                    raise CheckpointError(f"{self.ckpt_path}: no state of the {name} RNG")
                rng.bit_generator.state = saved[name]
            also = (ckpt["extra"] or {}).get("also", {})
            for name, obj in self.also.items():
                if name not in also:
                    raise CheckpointError(f"{self.ckpt_path}: no state of {name}")
                try:
                    obj.load_state_dict(also[name])
                except (ValueError, KeyError, IndexError) as e:
                    raise CheckpointError(f"{self.ckpt_path}: the state of {name} does not fit: {e}") from None
        if start > self.max_steps:
            raise ConfigError(f"{self.ckpt_path} is at step {start}, past --max-steps {self.max_steps}: "
                              f"give --max-steps {start} or more to go on, or --overwrite to start again")
        self.folder.open_metrics(start)
        self.step = start
        return start

    # ----- the steps ---------------------------------------------------------------------------

    def steps(self, start):
        """Step numbers ``start+1 .. max_steps``. A first Ctrl-C lets the step in progress end, saves
        it, and raises `Interrupted`; a second one stops at once (the last checkpoint stays)."""
        stop = []
        handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if stop:
                    raise KeyboardInterrupt
                stop.append(True)
                self.print(f"{self.stage}: stopping after step {self.step + 1} "
                           f"(Ctrl-C again to stop at once)")
            handler = signal.signal(signal.SIGINT, on_sigint)
        try:
            for step in range(start + 1, self.max_steps + 1):
                self.step = step - 1
                yield step
                self.step = step
                if stop and step < self.max_steps:
                    if self.saved_step != step:
                        self.save(step)
                    raise Interrupted(f"stopped after step {step}, saved in {self.ckpt_path}")
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)

    def update(self, loss, models=None, optimizers=None, what="loss"):
        """One optimizer step on the scalar Tensor ``loss``: zero the gradients, check the loss,
        backpropagate, clip the global norm over all ``models``' parameters to ``cfg.grad_clip``
        (0: no clipping), check that norm, step every optimizer. ``models`` and ``optimizers``
        default to the restored model and optimizer; PPO passes its policy and value model, which
        step together on one loss. ``what`` names the loss in the message if it is not finite.
        Returns ``(loss, grad_norm)`` as floats. Nothing non-finite reaches the weights."""
        from ..optim import clip_grad_norm_

        models = (self.model,) if models is None else tuple(models)
        optimizers = (self.optimizer,) if optimizers is None else tuple(optimizers)
        value = loss.item()
        self.check_finite(what, value)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        params = [p for model in models for p in model.parameters()]
        grad_norm = clip_grad_norm_(params, self.cfg.grad_clip or math.inf)   # the norm before clipping
        self.check_finite("gradient norm", grad_norm)
        for optimizer in optimizers:
            optimizer.step()
        return value, grad_norm

    def check_finite(self, quantity, value):
        """Raise `DivergenceError` unless ``value`` (a number, or an array on any device: every
        entry) is finite."""
        xp = get_array_module(value)
        values = xp.asarray(value, dtype=xp.float64)
        finite = xp.isfinite(values)
        if bool(finite.all()):
            return
        self.diverged(quantity, float(values[~finite].ravel()[0]))

    @contextlib.contextmanager
    def overflow_diverges(self, model="policy"):
        """A ``FloatingPointError`` inside the block (the last update made ``model``'s logits
        overflow while sampling) stops the run as `diverged`."""
        try:
            yield
        except FloatingPointError:
            self.diverged(model, "overflowing its logits")

    def diverged(self, quantity, value):
        """Stop the run with one line: the stage, the step, the quantity and its value, what to try.
        Nothing is saved: the last good checkpoint stays."""
        kept = (f"the checkpoint of step {self.saved_step} in {self.ckpt_path} is kept"
                if self.saved_step else "no checkpoint was written")
        hint = f"lower --lr (now {self.cfg.lr:g})" if hasattr(self.cfg, "lr") else "lower the lr"
        if hasattr(self.cfg, "grad_clip"):
            hint += (f" or clip the gradients (--grad-clip, now {self.cfg.grad_clip:g}; "
                     f"0 means no clipping)")
        raise DivergenceError(f"{self.stage} diverged at step {self.step + 1}: the {quantity} is "
                              f"{value}; {kept}; {hint}")

    def save_if_due(self, step):
        if step % self.cfg.ckpt_interval == 0 or step == self.max_steps:
            self.save(step)

    def save(self, step):
        """Write the checkpoint of ``step`` atomically (a file with a NaN weight is refused)."""
        also = {name: obj.state_dict() for name, obj in self.also.items()}
        for name, state in also.items():
            bad = non_finite(state)
            if bad:
                raise CheckpointError(f"{self.ckpt_path}: not written: {name}'s {bad} are NaN or infinite")
        save_checkpoint(self.ckpt_path, self.model, self.model.config, self.optimizer, step=step,
                        rng_state=self.rngs,
                        extra={"stage": self.stage, "init": getattr(self.cfg, "init", None),
                               "settings": asdict(self.cfg), "also": also})
        self.saved_step = step

    # ----- closing -----------------------------------------------------------------------------

    def close(self):
        """Release the folder (the lock, the metrics file, the bar); safe to call twice."""
        self.folder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
