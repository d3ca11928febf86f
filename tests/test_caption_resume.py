"""``vtr caption`` survives ``kill -9``: rerunning the same command ends with exactly one record per video."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from caption_testutil import make_video, read_records, save_tiny_video_model

N_VIDEOS = 16


def test_kill_9_mid_run_then_rerun_gives_exactly_one_record_per_video(tmp_path):
    model = save_tiny_video_model(tmp_path / "model")
    videos = sorted(str(make_video(tmp_path / "v" / f"clip{i:02d}.mp4", seed=i).absolute()) for i in range(N_VIDEOS))
    (tmp_path / "v" / "broken.mp4").write_bytes(b"\x00" * 100)
    out = tmp_path / "captions.jsonl"
    argv = ["caption", str(tmp_path / "v"), "--out", str(out), "--model", str(model), "--recipe", "pool",
            "--frames", "8", "--batch-size", "1", "--workers", "1", "--max-new-tokens", "24"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtr.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: its decode worker is orphaned, as in a crash
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # clean up whatever is left of that session
        except ProcessLookupError:
            pass
    first = read_records(out)
    assert 2 <= len(first) < N_VIDEOS + 1, "the kill did not interrupt the run"
    print(f"killed after {len(first)} of {N_VIDEOS + 1} records")
    # A crash can also tear the last line (power loss while writing): the rerun must repair it.
    with open(out, "ab") as f:
        f.write(b'{"path": "' + videos[-1].encode() + b'", "caption": "half a rec')

    # Rerun the same command, in a script that also checks the local engine never imports Ray.
    script = tmp_path / "rerun.py"
    script.write_text(
        "import sys\nfrom vtr.cli import main\nif __name__ == '__main__':\n"
        f"    rc = main({argv!r} + ['--no-progress'])\n"
        "    assert 'ray' not in sys.modules, 'the local engine imported ray'\n    sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dropped a torn last line" in done.stderr
    records = read_records(out)
    paths = [r["path"] for r in records]
    assert sorted(paths) == sorted([*videos, str((tmp_path / "v" / "broken.mp4").absolute())])  # each exactly once
    assert records[: len(first)] == first  # what the killed run recorded is kept, not redone
    assert sum(r["error"] is not None for r in records) == 1
    first_errors = sum(r["error"] is not None for r in first)
    expected = f"{N_VIDEOS - (len(first) - first_errors)} captioned, {1 - first_errors} failed, {len(first)} skipped"
    assert expected in done.stderr, (len(first), done.stderr[-400:])
