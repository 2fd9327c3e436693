"""Playing a world in a terminal (`genie play`): frames drawn with half-block characters in 24-bit colour,
actions typed one line at a time, every frame saved as a PNG and the whole game as a GIF on quitting.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np
from PIL import Image

QUIT_WORDS = frozenset({"q", "quit", "exit"})
UPPER_HALF_BLOCK = "\u2580"
RESET = "\x1b[0m"
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def half_block_lines(frame: np.ndarray) -> list[str]:
    """uint8 [H, W, 3] -> H/2 lines of W characters: each character is two pixels stacked, the upper one
    as the foreground colour of '▀' and the lower one as its background (a 64x64 frame: 64 x 32 cells)."""
    if frame.shape[0] % 2:  # an odd last row gets a black partner
        frame = np.concatenate([frame, np.zeros_like(frame[:1])])
    lines = []
    for upper, lower in zip(frame[0::2], frame[1::2]):
        cells = (f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m{UPPER_HALF_BLOCK}"
                 for a, b in zip(upper.tolist(), lower.tolist()))
        lines.append("".join(cells) + RESET)
    return lines


def parse_actions(line: str, num_actions: int) -> list[int] | str:
    """The actions of one typed line, or a message saying what to type instead (the line is not played)."""
    actions = []
    for word in line.replace(",", " ").split():
        if not word.isdigit() or int(word) >= num_actions:
            return (f"{word!r} is not an action: type numbers 0..{num_actions - 1} separated by spaces "
                    f"(e.g. '3 3 1'), or q to quit")
        actions.append(int(word))
    return actions


class Steppable(Protocol):
    def step(self, action: int) -> np.ndarray:  # frame uint8 [H, W, 3]
        ...


@dataclass
class TerminalGame:
    """One game of a world already reset to its first frame."""

    world: Steppable
    num_actions: int
    out: Path
    show_frames: bool = True
    stdin: TextIO = sys.stdin
    stdout: TextIO = sys.stdout
    frames: list[np.ndarray] = field(default_factory=list)

    def play(self, first_frame: np.ndarray) -> Path:
        """Read actions until q/quit/exit, end of input or Ctrl-C; returns the GIF of the game."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._add(first_frame)
        self._say(f"frames are saved to {self.out}/ (frame-NNNNN.png each step, play.gif when you quit)")
        try:
            while (line := self._ask()) is not None:
                if line.strip().lower() in QUIT_WORDS:
                    break
                actions = parse_actions(line, self.num_actions)
                if isinstance(actions, str):
                    self._say(actions)
                    continue
                for action in actions:
                    self._add(self.world.step(action))
        except KeyboardInterrupt:
            self._say("")
        return self._finish()

    def _ask(self) -> str | None:
        self._say(f"step {len(self.frames) - 1} | actions 0..{self.num_actions - 1}, one or more per line "
                  "(e.g. '3 3 1'); q, quit, exit or Ctrl-D to stop")
        self.stdout.write("action> ")
        self.stdout.flush()
        line = self.stdin.readline()
        return line or None  # "" only at end of input; an empty typed line is "\n"

    def _add(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        Image.fromarray(frame).save(self.out / f"frame-{len(self.frames) - 1:05d}.png")
        if self.show_frames:
            clear = CLEAR_SCREEN if self.stdout.isatty() else ""
            self.stdout.write(clear + "\n".join(half_block_lines(frame)) + "\n")

    def _finish(self) -> Path:
        from genie_models.render import save_gif
        gif = self.out / "play.gif"
        save_gif(self.frames, gif)
        self._say(f"saved {len(self.frames)} frames ({len(self.frames) - 1} steps) to {self.out}/ and {gif}")
        return gif

    def _say(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)
