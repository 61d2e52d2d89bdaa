"""A progress bar on stderr: tqdm's when it is installed, else a plain line every few seconds."""

import sys
import time

try:
    from tqdm import tqdm
except ImportError:  # the bar is a convenience; the benchmark runs without it
    tqdm = None


class _PlainProgress:
    def __init__(self, total: int):
        self.total, self.done, self.description, self.last = total, 0, "", 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        print(f"[{self.done}/{self.total}] done", file=sys.stderr)

    def set_description(self, text: str):
        self.description = text

    def update(self, count: int = 1):
        self.done += count
        if time.monotonic() - self.last > 5:
            self.last = time.monotonic()
            print(f"[{self.done}/{self.total}] {self.description}", file=sys.stderr)

    @staticmethod
    def write(text: str):
        print(text)


def progress_bar(total: int):
    if tqdm is None:
        return _PlainProgress(total)
    return tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True)


def write(text: str):
    """Prints above the bar without breaking it."""
    if tqdm is None:
        print(text)
    else:
        tqdm.write(text)
