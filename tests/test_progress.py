"""dpq.progress: a bar on a terminal, plain lines elsewhere, nothing with --quiet."""

import io

from dpq.progress import LineProgress, progress_bar


def test_a_file_gets_one_line_per_tenth_and_one_at_the_end():
    stream = io.StringIO()
    clock = iter(range(100)).__next__
    bar = LineProgress(1000, "encode", "img", stream, clock=lambda: float(clock()))
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix_str("done")
    bar.close()
    bar.close()  # closing twice prints once
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].startswith("encode:  10% (100/1,000 img")
    assert lines[-1].startswith("encode: 100% (1,000/1,000 img") and lines[-1].endswith("; done")


def test_not_a_terminal_never_gets_a_tqdm_bar_and_quiet_gets_nothing():
    stream = io.StringIO()
    with progress_bar(5, "train", "step", stream=stream) as bar:
        assert isinstance(bar, LineProgress)
        bar.update(5)
    assert stream.getvalue().count("\n") == 1
    silent = io.StringIO()
    with progress_bar(5, "train", enabled=False, stream=silent) as bar:
        bar.update(5)
        bar.set_postfix_str("x")
    assert silent.getvalue() == ""


def test_an_update_that_crosses_several_tenths_prints_one_line():
    stream = io.StringIO()
    bar = LineProgress(5, "evaluate", "run", stream, clock=lambda: 1.0)
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
