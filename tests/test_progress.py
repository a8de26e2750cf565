"""Progress lines of long jobs: done of total, rate and time left from a clock under the test's control."""
import io

from diffattr.progress import Progress, duration


def test_lines_give_done_rate_and_time_left():
    now = [100.0]
    out = io.StringIO()
    progress = Progress(10, "training steps", done=2, every=5, stream=out, clock=lambda: now[0])
    for _ in range(4):  # 4 steps of 2 s: a line after 6 s (the third step) only
        now[0] += 2
        progress.step()
    lines = out.getvalue().splitlines()
    assert lines == ["training steps: 5/10 (50%), 0.5/s, 6s elapsed, 10s left"]
    for _ in range(4):  # the last step always prints
        now[0] += 2
        progress.step()
    assert out.getvalue().splitlines()[-1] == "training steps: 10/10 (100%), 0.5/s, 16s elapsed, 0s left"
    assert duration(3725) == "1h02m" and duration(185) == "3m05s" and duration(42) == "42s"
