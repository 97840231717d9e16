"""Progress reports: plain lines in logs (every 10% and at the end), a bar on a terminal."""

import io

from kosmos_g.platform.data import shards
from kosmos_g.platform.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_and_a_final_line():
    log = io.StringIO()
    with Progress("scoring", total=50, unit="images", stream=log, min_interval_s=0) as progress:
        for _ in range(50):
            progress.update()
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{n}/50" for n in range(5, 50, 5)] + ["50/50"]
    assert lines[-1].startswith("[scoring] 50/50 images done")


def test_fast_work_is_not_a_line_per_item():
    log = io.StringIO()
    with Progress("quick", total=18, stream=log) as progress:  # default: at most a line per 2 s
        for _ in range(18):
            progress.update()
    assert log.getvalue().splitlines()[-1].startswith("[quick] 18/18 items done")
    assert len(log.getvalue().splitlines()) <= 2


def test_large_updates_do_not_repeat_lines_and_unknown_totals_still_end():
    log = io.StringIO()
    with Progress("rows", total=100, stream=log, min_interval_s=0) as progress:
        progress.update(35)
        progress.update(65)
    assert [line.split()[1] for line in log.getvalue().splitlines()] == ["35/100", "100/100"]
    log = io.StringIO()
    with Progress("stream", total=None, stream=log) as progress:
        progress.update(7)
    assert log.getvalue().startswith("[stream] 7 items done")


def test_a_terminal_gets_a_tqdm_bar():
    screen = Terminal()
    with Progress("download", total=4, unit="files", stream=screen) as progress:
        progress.update(4)
    assert "download: 100%" in screen.getvalue() and "4/4" in screen.getvalue()


def test_shard_writes_report_progress(tmp_path, capsys):
    rows = [{"key": str(i), "caption": f"a red circle {i}", "image": b"x", "width": 1, "height": 1}
            for i in range(20)]
    shards.write_rows(str(tmp_path / "captions"), "captions", rows, rows_per_shard=8)
    assert "[write captions] 20/20 rows done" in capsys.readouterr().err
