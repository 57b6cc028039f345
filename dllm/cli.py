"""What every ``dllm-*`` command shares in its flags: ``--version``, ``--threads``, one spelling per choice,
the way defaults are shown, and progress lines that suit logs (errors, exit codes and one-line warnings:
``dllm.cli_common``).

Light on purpose (no torch): every command builds its parser from here before anything heavy loads,
so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import enum
import sys

THREADS_HELP = ("CPU threads {what} (default {default}: chosen so that a loaded machine does not slow the run "
                "down). Raise it for models of hundreds of millions of parameters on a CPU with idle cores{gpu}")
THREADS_DEFAULT = "ONNX Runtime: the cores, at most 4 (idle threads sleep); torch: 1 (its pool spins)"


def version_text(prog: str) -> str:
    from dllm import __version__

    return f"{prog} (dllm-deploy) {__version__}"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_common(parser: argparse.ArgumentParser, threads_for: str = "per generation",
               gpu_note: str = "; GPU runs ignore it", threads_default: str = THREADS_DEFAULT) -> None:
    """``--version`` and ``--threads N`` on ``parser``; ``threads_for`` says what the threads do."""
    parser.add_argument("--version", action="version", version=version_text(parser.prog),
                        help="print the version and exit")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help=THREADS_HELP.format(what=threads_for, gpu=gpu_note, default=threads_default))


def spelled(value: str) -> str:
    """How a choice is shown and typed: lower case, hyphens (``per-token``, ``dllm-cache``)."""
    return str(value).strip().lower().replace("_", "-")


def choice_values(choices) -> list[str]:
    """The shown spelling of every choice (an Enum class or an iterable of strings)."""
    if isinstance(choices, type) and issubclass(choices, enum.Enum):
        choices = [c.value for c in choices]
    return [spelled(c) for c in choices]


def add_choice(parser, flag: str, choices, default=None, help: str = "", **kw):
    """An option with a fixed set of values: shown with hyphens, typed with hyphens or underscores."""
    values = choice_values(choices)
    text = help + (f" (default {show(default)})" if default is not None else "")
    return parser.add_argument(flag, type=spelled, choices=values, default=default, help=text,
                               metavar="{" + ",".join(values) + "}", **kw)


def show(value) -> str:
    """A default value as a user would type it on the command line."""
    if isinstance(value, enum.Enum):
        return spelled(value.value)
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value % 1 == 0:       # a whole float (inf and nan are not)
        return str(int(value))
    return str(value)


class Progress:
    """A progress display per stage on stderr: a tqdm bar on a terminal, one plain line per finished item
    elsewhere (logs and CI keep readable lines instead of carriage returns)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bars: dict = {}

    def update(self, stage: str, total: int, item: str, status: str, done: bool) -> None:
        """``done``: the item finished (advance); otherwise it started (terminal only: shown as running)."""
        if not self.tty:
            if done:
                count = self.bars[stage] = self.bars.get(stage, 0) + 1
                print(f"{stage}: {count}/{total} {item} {status}", file=self.stream, flush=True)
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="item", file=self.stream, leave=True,
                                          dynamic_ncols=True)
        bar.set_postfix_str(f"{item} {status}" if done else item)
        if done:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

    def close(self) -> None:
        if self.tty:
            for bar in self.bars.values():
                bar.close()
