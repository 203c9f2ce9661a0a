"""The training loop's skeleton (tensorpoly_ds.engine.loop.TrainLoop) and its local backend
(tensorpoly_ds.adapt.local_train.LocalTrainer), in this process on a two-parameter model: the order of the
loop's calls, the metrics vocabulary, and a stopped loop resuming from its checkpoint to the same numbers."""

import torch
from torch import nn

from tensorpoly_ds.adapt.local_train import CHECKPOINT_FILE, EpochSampler, LocalTrainer, load_checkpoint
from tensorpoly_ds.engine.loop import TrainLoop, lr_factor


class Recorded(TrainLoop):
    """A backend that records which hook ran at which step; a stop request at `stop_at`."""

    def __init__(self, steps: int, stop_at: int | None = None):
        self.total_steps, self.stop_at, self.calls = steps, stop_at, []

    def before_steps(self):
        self.calls.append(("before", self.step_no))

    def step(self):
        self.step_no += 1
        self.calls.append(("step", self.step_no))
        return {"train/loss": float(self.step_no)}

    def record(self, metrics):
        self.calls.append(("record", self.step_no))

    def stop_requested(self):
        return self.step_no == self.stop_at

    def on_stop(self):
        self.calls.append(("on_stop", self.step_no))

    def after_step(self):
        self.calls.append(("after", self.step_no))

    def finish(self):
        self.calls.append(("finish", self.step_no))


def test_loop_calls_the_hooks_in_order_and_a_stop_skips_the_rest():
    """Mutations seen caught: after_step called before the stop check (a stopped step evaluated and
    checkpointed twice), finish also called after a stop."""
    done = Recorded(2)
    assert done.loop() == "done"
    assert done.calls == [
        ("before", 0),
        ("step", 1),
        ("record", 1),
        ("after", 1),
        ("step", 2),
        ("record", 2),
        ("after", 2),
        ("finish", 2),
    ]
    stopped = Recorded(3, stop_at=2)
    assert stopped.loop() == "requeue"
    assert stopped.calls == [
        ("before", 0),
        ("step", 1),
        ("record", 1),
        ("after", 1),
        ("step", 2),
        ("record", 2),
        ("on_stop", 2),
    ]


class Stop:
    signal = None


def local_loop(model, stop=None, checkpoint=None, steps=4):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 0.1, "name": "modules"}], lr=0.1)

    def loss_fn(idx):
        err = model(x[idx]) - y[idx]
        return {"loss": (err**2).mean(), "abs": err.abs().mean()}

    return LocalTrainer(
        model,
        steps=steps,
        sampler=EpochSampler(8, 4, seed=1),
        make_batch=lambda idx: idx,
        loss_fn=loss_fn,
        optimizer=optimizer,
        warmup_ratio=0.5,
        clip=1.0,
        grad_accum=2,
        stop=stop,
        checkpoint=checkpoint,
    )


def fresh_model():
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def test_local_backend_speaks_the_metrics_vocabulary():
    """Mutation seen caught: lr/<group> read after the optimizer step (the next step's rate): step 1 then
    says 0.1 * lr_factor(1) instead of the 0.1 * lr_factor(0) it used."""
    history, stopped = local_loop(fresh_model()).run()
    assert stopped is None
    assert [sorted(h) for h in history] == [["lr/modules", "step", "train/abs", "train/grad_norm", "train/loss"]] * 4
    assert [h["lr/modules"] for h in history] == [0.1 * lr_factor(s, 4, 0.5, "linear") for s in range(4)]
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_local_backend_stops_with_a_checkpoint_and_resumes_to_the_same_numbers(tmp_path):
    """The same computation twice in one process: bitwise. Mutation seen caught: resume not restoring the
    sampler state (the resumed steps draw other rows; losses differ)."""
    reference, _ = local_loop(fresh_model()).run()
    stop = Stop()
    ckpt = tmp_path / CHECKPOINT_FILE
    first = local_loop(fresh_model(), stop=stop, checkpoint=ckpt)
    first.on_step = lambda step, metrics: setattr(stop, "signal", 15) if step == 2 else None
    history, stopped = first.run()
    assert stopped == 2 and len(history) == 2 and ckpt.is_file()
    model = fresh_model()
    rest, stopped = local_loop(model).run(load_checkpoint(ckpt))
    assert stopped is None
    assert [h["step"] for h in rest] == [3, 4]
    assert [h["train/loss"] for h in history + rest] == [h["train/loss"] for h in reference]
