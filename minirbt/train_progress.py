"""Progress of a distillation run, shown to the user: the progress bar and TensorBoard (rank 0 only).

Train terms are averaged over ``--logging_steps`` optimizer steps (skipped steps excluded) and kept in the
run's ``history`` (written into every checkpoint and the final summary); dev scores go to ``dev_history``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from minirbt.trainer import Run


class Progress:
    """The progress bar and TensorBoard (rank 0 only): train terms averaged over --logging_steps, dev scores."""

    def __init__(self, run: Run, name: str = "distill"):
        self.run, self.main = run, run.d.main
        self.writer = None
        if self.main:
            run.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.out / "runs"))
        self.bar = tqdm(total=run.args.max_steps, initial=run.step, desc=name, disable=not self.main,
                        dynamic_ncols=True)
        self.sums: dict[str, float] = {}
        self.count = 0

    def step(self, terms: dict[str, float], grad_norm: float, skipped: bool) -> None:
        run, step = self.run, self.run.step
        if not skipped:
            for name, value in terms.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.count += 1
        if not self.main:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{sum(terms.values()):.4f}", lr=f"{run.optimization.lr:.2e}")
        if self.count and (step % run.args.logging_steps == 0 or step == run.args.max_steps):
            run.history.append({"step": step, **{k: v / self.count for k, v in self.sums.items()}})
            for name, value in self.sums.items():
                self.writer.add_scalar(f"train/{name}", value / self.count, step)
            self.writer.add_scalar("train/loss", sum(self.sums.values()) / self.count, step)
            self.writer.add_scalar("train/lr", run.optimization.lr, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
            self.sums, self.count = {}, 0

    def dev(self, scores: dict) -> None:
        step = self.run.step
        self.run.dev_history.append({"step": step, **scores})
        for name, value in scores.items():
            self.writer.add_scalar(f"dev/{name}", value, step)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
