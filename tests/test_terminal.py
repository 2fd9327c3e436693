"""Unit tests of the terminal play helpers: half-block drawing and parsing typed actions."""

import numpy as np

from genie_models.terminal import UPPER_HALF_BLOCK, half_block_lines, parse_actions


def test_half_block_lines_draw_two_pixel_rows_per_line_upper_as_foreground():
    frame = np.zeros((4, 3, 3), dtype=np.uint8)
    frame[0, 0] = (255, 0, 0)  # upper pixel of the first cell
    frame[1, 0] = (0, 0, 255)  # lower pixel of the first cell
    lines = half_block_lines(frame)
    assert len(lines) == 2 and all(line.count(UPPER_HALF_BLOCK) == 3 for line in lines)
    assert lines[0].startswith(f"\x1b[38;2;255;0;0m\x1b[48;2;0;0;255m{UPPER_HALF_BLOCK}")
    assert lines[0].endswith("\x1b[0m")


def test_half_block_lines_pad_an_odd_last_row_with_black():
    lines = half_block_lines(np.full((3, 2, 3), 7, dtype=np.uint8))
    assert len(lines) == 2 and "\x1b[48;2;0;0;0m" in lines[1] and "\x1b[48;2;0;0;0m" not in lines[0]


def test_parse_actions_accepts_spaces_and_commas_and_names_the_bad_word():
    assert parse_actions(" 3 3,1 \n", num_actions=8) == [3, 3, 1]
    assert parse_actions("\n", num_actions=8) == []
    assert parse_actions("1 8", num_actions=8) == "'8' is not an action: type numbers 0..7 separated by spaces " \
                                                   "(e.g. '3 3 1'), or q to quit"
    assert parse_actions("-1", num_actions=8).startswith("'-1' is not an action")
