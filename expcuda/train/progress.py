"""What the user sees: a tqdm bar per epoch (loss, accuracy, f, images/s) and one log line per epoch."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Bars and lines on the main rank only; ``enabled=False`` keeps the lines, drops the bars."""

    def __init__(self, main: bool, enabled: bool, stream=None):
        self.main, self.enabled, self.stream = main, enabled, stream or sys.stderr
        self.bar = None

    def start(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if self.main and self.enabled:
            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                            file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, steps: int, loss: float, acc: float, f: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}%", f=f"{f:.3f}", img_s=f"{ips:.0f}",
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, text: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            tqdm.write(text, file=self.stream)
        else:
            print(text, flush=True)


def epoch_line(row: dict, epochs: int, expanded: bool) -> str:
    """e.g. ``epoch 3/10  loss 0.412 acc 85.2% | test 86.0% at f=0.35, LP 84.1% | 2300 img/s, data wait 2% | 26 s``."""
    test = f"test {row['test_acc']:.2f}%"
    if expanded:
        test += f" at f={row['f']:.3f}, LP alone {row['test_acc_lp']:.2f}%"
    return (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | {test} | "
            f"lr {row['lr']:.2g} | {row['images_per_s']:.0f} img/s, data wait {100 * row['data_wait']:.1f}% | "
            f"{row['epoch_time']:.1f} s")
