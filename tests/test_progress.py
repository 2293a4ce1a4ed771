"""dpq.progress: a bar on a terminal, plain lines elsewhere, nothing with --quiet."""

import io

from dpq.progress import LineProgress, progress_bar


def test_a_file_gets_one_line_per_tenth_and_one_at_the_end():
    stream = io.StringIO()
    ticks = iter(range(0, 10_000, 3)).__next__  # 3 s per reading
    bar = LineProgress(1000, "encode", "img", stream, clock=lambda: float(ticks()))
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix_str("done")
    bar.close()
    bar.close()  # closing twice prints once
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].startswith("encode:  10% (100/1,000 img")
    assert lines[-1].startswith("encode: 100% (1,000/1,000 img") and lines[-1].endswith("; done")


def test_not_a_terminal_never_gets_a_tqdm_bar_and_quick_work_says_nothing():
    stream = io.StringIO()
    with progress_bar(5, "train", "step", stream=stream) as bar:
        assert isinstance(bar, LineProgress)
        bar.update(5)
    assert stream.getvalue() == ""  # done within QUIET_SECONDS
    slow = io.StringIO()
    now = [0.0]
    bar = LineProgress(5, "train", "step", slow, clock=lambda: now[0])
    bar.update(1)
    now[0] = 5.0
    bar.update(4)
    bar.close()
    assert slow.getvalue().count("\n") == 1 and "100% (5/5 step, 5.0 s" in slow.getvalue()
    silent = io.StringIO()
    with progress_bar(5, "train", enabled=False, stream=silent) as bar:
        bar.update(5)
        bar.set_postfix_str("x")
    assert silent.getvalue() == ""


def test_an_update_that_crosses_several_tenths_prints_one_line():
    stream = io.StringIO()
    ticks = iter(range(0, 100, 3)).__next__
    bar = LineProgress(5, "evaluate", "run", stream, clock=lambda: float(ticks()))
    for _ in range(5):
        bar.update(1)  # each run is 2 tenths
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [
        "20",
        "40",
        "60",
        "80",
        "100",
    ]
