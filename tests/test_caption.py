"""``vtr caption``: the record log, finding videos, the config, decoding, the local engine end to end, the CLI.

The kill -9 test is in ``test_caption_resume.py``, the Ray engine in ``test_caption_ray.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from caption_testutil import fake_reader, make_video, make_video_folder, read_records, save_tiny_video_model
from hypothesis import given, settings
from hypothesis import strategies as st

from vtr.cli import main
from vtr.video.caption import (
    CaptionConfig,
    CaptionSetupError,
    caption_videos,
    check_output,
    find_videos,
    load_config,
)
from vtr.video.caption_decode import DecodePool, make_decode_task
from vtr.video.caption_log import LogBusyError, RecordWriter, encode_record, read_log, rewrite_log

ROOT = Path(__file__).resolve().parents[1]
RECORD_FIELDS = {
    "path", "caption", "error", "error_stage", "frames", "duration", "visual_tokens_before", "visual_tokens_after",
    "timings", "recipe", "model", "prompt", "finished",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the log
def test_read_log_drops_torn_tail_and_keeps_latest_duplicate(tmp_path):
    log = tmp_path / "c.jsonl"
    log.write_bytes(
        encode_record({"path": "/a", "error": "x"})
        + encode_record({"path": "/b", "error": None})
        + encode_record({"path": "/a", "error": None})
        + b'{"path": "/c", "capt'
    )
    state = read_log(log)
    assert list(state.records) == ["/b", "/a"]
    assert state.records["/a"]["error"] is None
    assert (state.lines, state.duplicates, state.torn_bytes) == (3, 1, len(b'{"path": "/c", "capt'))
    assert state.needs_compaction


def test_read_log_of_missing_or_empty_file(tmp_path):
    assert read_log(tmp_path / "none.jsonl").records == {}
    (tmp_path / "e.jsonl").write_bytes(b"")
    state = read_log(tmp_path / "e.jsonl")
    assert state.records == {} and not state.needs_compaction


@pytest.mark.parametrize(
    ("line", "message"),
    [(b"not json\n", "c.jsonl:2: not a JSON line"), (b'{"caption": "x"}\n', "c.jsonl:2: a caption record must")],
)
def test_read_log_refuses_a_malformed_complete_line(tmp_path, line, message):
    log = tmp_path / "c.jsonl"
    log.write_bytes(encode_record({"path": "/a"}) + line)
    with pytest.raises(ValueError, match=message):
        read_log(log)


def test_rewrite_is_atomic_when_it_fails(tmp_path):
    log = tmp_path / "c.jsonl"
    rewrite_log(log, [{"path": "/a"}, {"path": "/b"}])
    before = log.read_bytes()
    with pytest.raises(ValueError, match="Out of range float"):
        rewrite_log(log, [{"path": "/a"}, {"path": "/c", "duration": float("nan")}])
    assert log.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no temporary file left behind


def test_writer_appends_whole_lines_and_holds_the_lock(tmp_path):
    log = tmp_path / "c.jsonl"
    with RecordWriter(log) as w:
        with pytest.raises(LogBusyError, match="another vtr caption run is writing"):
            RecordWriter(log)
        w.write({"path": "/a", "caption": "x\ny"})  # a newline inside a caption stays escaped
        w.rewrite([{"path": "/z"}])
        w.write({"path": "/b", "caption": "ü"})
    assert [r["path"] for r in read_records(log)] == ["/z", "/b"]
    assert log.read_bytes().count(b"\n") == 2
    RecordWriter(log).close()  # the lock is free again


records_st = st.lists(
    st.fixed_dictionaries(
        {"path": st.sampled_from(["/a", "/b", "/c", "/ü d"]), "error": st.none() | st.text(max_size=5)}
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(records=records_st, cut=st.integers(min_value=0, max_value=10_000))
def test_property_any_crash_point_leaves_complete_lines_then_one_record_per_path(tmp_path_factory, records, cut):
    """Truncating the log anywhere (a crash mid-write) keeps exactly the records of the complete lines, the
    latest per path; compacting them leaves one line per path that reads back identically."""
    log = tmp_path_factory.mktemp("log") / "c.jsonl"
    data = b"".join(encode_record(r) for r in records)
    cut = min(cut, len(data))
    log.write_bytes(data[:cut])
    complete = data[: data[:cut].rfind(b"\n") + 1]
    expected: dict[str, dict] = {}
    for line in complete.splitlines():
        r = json.loads(line)
        expected.pop(r["path"], None)
        expected[r["path"]] = r
    state = read_log(log)
    assert state.records == expected
    assert state.torn_bytes == cut - len(complete)
    rewrite_log(log, state.records.values())
    again = read_log(log)
    assert again.records == expected and not again.needs_compaction
    assert again.lines == len(expected)


# ------------------------------------------------------------------------------------------------ INPUT / OUT
def test_find_videos_in_folder_glob_list_and_file(tmp_path):
    vids = make_video_folder(tmp_path / "v")
    everything = sorted(vids["good"] + vids["bad"])
    assert find_videos(str(tmp_path / "v")) == everything  # recursive, video extensions only, absolute
    assert find_videos(str(tmp_path / "v" / "*.mp4")) == sorted(p for p in everything if p.endswith(".mp4")
                                                                and "nested" not in p)  # fmt: skip
    assert find_videos(str(tmp_path / "v" / "**" / "clip*.mp4")) == vids["good"]
    listing = tmp_path / "lists" / "videos.txt"
    listing.parent.mkdir()
    listing.write_text(f"# my videos\n\n../v/clip2.mp4\n{vids['good'][0]}\n../v/clip2.mp4\n../v/missing.mp4\n")
    assert find_videos(str(listing)) == [
        str((tmp_path / "v" / "clip2.mp4").absolute()),
        vids["good"][0],
        str((tmp_path / "v" / "missing.mp4").absolute()),  # recorded as a failure later, not an error here
    ]
    assert find_videos(vids["good"][2]) == [vids["good"][2]]


def test_find_videos_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    (tmp_path / "binary.lst").write_bytes(b"\xff\xfe\x00\x81")
    cases = {
        str(tmp_path / "nope"): "INPUT not found",
        str(tmp_path / "empty"): "no videos in folder",
        str(tmp_path / "*.mov"): "matches no files",
        str(tmp_path / "blank.txt"): "names no videos",
        str(tmp_path / "binary.lst"): "nor a UTF-8 text file of paths",
    }
    for spec, message in cases.items():
        with pytest.raises(CaptionSetupError, match=message):
            find_videos(spec)


def test_check_output(tmp_path):
    assert check_output(str(tmp_path / "new" / "dir" / "c.jsonl")) == tmp_path / "new" / "dir" / "c.jsonl"
    with pytest.raises(CaptionSetupError, match="is a folder"):
        check_output(str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CaptionSetupError, match="cannot write --out"):
        check_output(str(tmp_path / "file" / "c.jsonl"))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be an int >= 1, got 0"),
        ("workers", -1, "workers must be an int >= 0"),
        ("engine", "spark", "engine must be one of \\['local', 'ray'\\], got 'spark'"),
        ("keep", 1.5, "got 1.5"),
        ("fps", 0.0, "fps must be a finite number > 0"),
        ("retry_errors", "yes", "retry_errors must be true or false"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        CaptionConfig(input="x", out="y", **{field: value})


def test_yaml_run_config(tmp_path):
    data = load_config(ROOT / "configs" / "runs" / "caption.yaml")
    config = CaptionConfig(input="videos", out="c.jsonl", **data)
    assert config.engine == "local" and config.batch_size >= 1
    bad = tmp_path / "c.yaml"
    bad.write_text("batch-size: 2\nbatchsize: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batchsize'\]; allowed keys: \['input'"):
        load_config(bad)


def test_read_kwargs():
    assert CaptionConfig(input="x", out="y", frames=6).read_kwargs() == {
        "num_frames": 6,
        "fps": None,
        "max_frames": None,
    }
    assert CaptionConfig(input="x", out="y", fps=2.0, max_frames=16).read_kwargs() == {
        "num_frames": None, "fps": 2.0, "max_frames": 16,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ decoding
def test_decode_pool_survives_crashes_hangs_and_errors():
    """A segfaulting or hanging decoder costs only its own video: it is reported and the worker replaced."""
    paths = ["/v/ok1", "/v/crash", "/v/ok2", "/v/hang", "/v/bad", "/v/long", "/v/ok3"]
    task = make_decode_task(fake_reader, {}, max_duration=5.0)
    with DecodePool(task, workers=2, prefetch=2, timeout=4.0) as pool:
        results = {r.path: r for r in pool.imap(paths)}
    assert sorted(results) == sorted(paths)
    assert {p for p, r in results.items() if r.error is None} == {"/v/ok1", "/v/ok2", "/v/ok3"}
    assert results["/v/crash"].error == "DecoderCrash: the decoder process died (signal 11) on /v/crash"
    assert results["/v/hang"].error.startswith("DecodeTimeout: decoding took over 4 s")
    assert results["/v/bad"].error == "ValueError: cannot read /v/bad"
    assert results["/v/long"].error == "ValueError: video too long: 10.0 s > max_duration 5 s: /v/long"
    assert pool.replaced == 2


def test_decode_inline_with_zero_workers():
    task = make_decode_task(fake_reader, {}, max_duration=None)
    with DecodePool(task, workers=0, prefetch=1) as pool:
        results = list(pool.imap(["/v/a", "/v/bad", "/v/long"]))
    assert [r.error for r in results] == [None, "ValueError: cannot read /v/bad", None]


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_video_model(tmp_path_factory.mktemp("tiny-qwen2-vl"))


def test_local_engine_end_to_end_resume_and_retry(tmp_path, tiny_model):
    vids = make_video_folder(tmp_path / "v")
    long_clip = str(make_video(tmp_path / "v" / "long.mp4", frames=40, seed=7).absolute())  # 5 s > max_duration
    out = tmp_path / "out" / "captions.jsonl"
    cfg = dict(input=str(tmp_path / "v"), out=str(out), model=str(tiny_model), recipe="pool", keep=0.25,
               frames=4, batch_size=2, workers=2, max_duration=3.0)  # fmt: skip
    notes: list[str] = []
    summary = caption_videos(CaptionConfig(**cfg), progress=False, log=notes.append)
    records = read_records(out)
    by_path = {r["path"]: r for r in records}
    assert len(records) == len(by_path) == 8  # one record per video, none twice
    assert set(by_path) == set(vids["good"] + vids["bad"] + [long_clip])
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert r["recipe"] == "pool(keep=0.25)" and r["model"] == str(tiny_model)
    for path in vids["good"]:
        r = by_path[path]
        assert r["error"] is None and isinstance(r["caption"], str)
        assert r["frames"] == (2 if "clip1" in path else 4)  # the 3-frame clip: Qwen takes frames in pairs
        assert r["visual_tokens_after"] == round(0.25 * r["visual_tokens_before"])
        assert r["timings"]["generate_s"] > 0 and r["timings"]["batch_size"] in (1, 2)
    corrupt, empty, single = vids["bad"]
    assert "corrupt file" in by_path[corrupt]["error"]
    assert "empty (0 bytes)" in by_path[empty]["error"]
    assert "packs 2 frames per temporal step but the clip has only 1 frame(s)" in by_path[single]["error"]
    assert "too long: 5.0 s > max_duration 3 s" in by_path[long_clip]["error"]
    assert all(by_path[p]["caption"] is None for p in [*vids["bad"], long_clip])
    assert {by_path[p]["error_stage"] for p in [*vids["bad"], long_clip]} == {"video"}
    assert all(by_path[p]["error_stage"] is None for p in vids["good"])
    assert (summary.captioned, summary.failed, summary.skipped) == (4, 4, 0)
    assert notes[-1].startswith("vtr caption done: 4 captioned, 4 failed, 0 skipped")

    # Rerun: everything is recorded, nothing is redone, the file is untouched.
    before = out.read_bytes()
    summary = caption_videos(CaptionConfig(**cfg), progress=False, log=notes.append)
    assert (summary.captioned, summary.failed, summary.skipped) == (0, 0, 8)
    assert out.read_bytes() == before

    # --retry-errors after a crash that left a torn line: the torn line goes, the 4 error records are
    # replaced by new ones (the 5 s clip now passes a larger max_duration), the good records stay as they were.
    with open(out, "ab") as f:
        f.write(b'{"path": "' + vids["good"][0].encode() + b'", "capt')
    summary = caption_videos(CaptionConfig(**{**cfg, "retry_errors": True, "max_duration": 10.0}),
                             progress=False, log=notes.append)  # fmt: skip
    assert "dropped a torn last line" in notes[-2] and "removed 4 error record(s) to retry" in notes[-2]
    after = {r["path"]: r for r in read_records(out)}
    assert len(read_records(out)) == 8 and set(after) == set(by_path)
    assert (summary.captioned, summary.failed, summary.skipped) == (1, 3, 4)
    assert all(after[p] == by_path[p] for p in vids["good"])
    assert after[long_clip]["error"] is None and after[long_clip]["frames"] == 4


def test_model_without_video_support_fails_before_recording(tmp_path):
    make_video(tmp_path / "v" / "a.mp4")
    out = tmp_path / "c.jsonl"
    with pytest.raises(ValueError, match="does not take videos"):
        caption_videos(CaptionConfig(input=str(tmp_path / "v"), out=str(out), model=str(ROOT / "assets" /
                       "tiny-vqa-llava"), workers=0), progress=False, log=lambda _: None)  # fmt: skip
    assert read_records(out) == []


def _rec(path: str, stage: str | None = None) -> dict:
    return {"path": path, "error": None if stage is None else "boom", "error_stage": stage}


class _Bar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass


def test_model_failures_are_held_until_the_model_captions_a_video(tmp_path):
    """Model-stage failures before any success are not recorded; after one success they all are."""
    from vtr.video.caption import Summary, _Recorder

    with RecordWriter(tmp_path / "c.jsonl") as w:
        summary = Summary(total=5, skipped=0)
        emit = _Recorder(["/a", "/b", "/c", "/d", "/e"], w, summary, _Bar())
        emit(_rec("/a", "caption"))
        emit(_rec("/b", "video"))  # the video's own fault: recorded at once
        assert [r["path"] for r in read_records(tmp_path / "c.jsonl")] == ["/b"]
        emit(_rec("/c"))
        emit(_rec("/d", "caption"))
        with pytest.raises(RuntimeError, match="second record for /c"):
            emit(_rec("/c"))
    assert [r["path"] for r in read_records(tmp_path / "c.jsonl")] == ["/b", "/c", "/a", "/d"]
    assert (summary.captioned, summary.failed) == (1, 3)


def test_a_model_that_fails_on_everything_stops_the_run_and_records_nothing(tmp_path):
    from vtr.video.caption import ABORT_AFTER_MODEL_FAILURES, ModelFailedError, Summary, _Recorder

    with RecordWriter(tmp_path / "c.jsonl") as w:
        emit = _Recorder([f"/{i}" for i in range(9)], w, Summary(total=9, skipped=0), _Bar())
        with pytest.raises(ModelFailedError, match=r"failed on the first 3 video\(s\) it tried .* \(/0\): boom"):
            for i in range(ABORT_AFTER_MODEL_FAILURES):
                emit(_rec(f"/{i}", "caption"))
    assert not (tmp_path / "c.jsonl").exists()  # nothing was written


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_caption_with_yaml_config(tmp_path, tiny_model, capsys):
    make_video(tmp_path / "v" / "a.mp4")
    make_video(tmp_path / "v" / "b.mp4", seed=1)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\nrecipe: none\nframes: 2\nbatch-size: 2\nworkers: 1\nout: unused.jsonl\n")
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(tmp_path / "v"), "--out", str(out), "--config", str(config), "--no-progress"]) == 0
    records = read_records(out)
    assert len(records) == 2 and all(r["recipe"] == "none" and r["frames"] == 2 for r in records)
    assert all(r["visual_tokens_after"] == r["visual_tokens_before"] > 0 for r in records)
    assert "vtr caption done: 2 captioned, 0 failed, 0 skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing"], "INPUT not found: {tmp}/missing"),
        (["{tmp}/*.avi"], "matches no files"),
        (["{tmp}/v", "--out", "{tmp}"], "is a folder; give a .jsonl file path"),
        (["{tmp}/v", "--out", "{tmp}/v/a.mp4/c.jsonl"], "cannot write --out"),
        (["{tmp}/v", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["{tmp}/v", "--batch-size", "0"], "batch_size must be an int >= 1"),
    ],
)
def test_cli_caption_setup_errors_before_any_work(tmp_path, capsys, args, message):
    make_video(tmp_path / "v" / "a.mp4")
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "c.jsonl")]
    assert main(["caption", *argv, "--model", str(tmp_path / "never-loaded"), "--no-progress"]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists() or (tmp_path / "c.jsonl").read_bytes() == b""


def test_cli_caption_needs_out(capsys, tmp_path):
    assert main(["caption", str(tmp_path)]) == 2
    assert "vtr caption needs --out OUT.jsonl" in capsys.readouterr().err


def test_local_engine_does_not_import_ray(tmp_path, tiny_model):
    make_video(tmp_path / "v" / "a.mp4")
    code = (
        "import sys\n"
        "from vtr.cli import main\n"
        "if __name__ == '__main__':\n"
        f"    assert main(['caption', {str(tmp_path / 'v')!r}, '--out', {str(tmp_path / 'c.jsonl')!r}, '--model',"
        f" {str(tiny_model)!r}, '--frames', '2', '--workers', '1', '--no-progress']) == 0\n"
        "    assert 'ray' not in sys.modules, 'the local engine imported ray'\n"
    )
    script = tmp_path / "run.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(read_records(tmp_path / "c.jsonl")) == 1


def test_caption_speed_benchmark_runs_on_a_tiny_setting(tmp_path, tiny_model, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "caption-speed", "--videos", "3", "--size", "64x48", "--clip-frames", "8", "--frames", "8",
            "--batch-size", "1", "--setups", "local-w1", "--recipes", "none,storm,nope", "--model", str(tiny_model),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["recipe"]: r for r in results["rows"]}
    assert set(rows) == {"none", "storm"}
    assert rows["none"]["videos"] == rows["storm"]["videos"] == 3
    assert rows["storm"]["visual_tokens_after"] < rows["none"]["visual_tokens_after"] == rows["none"][
        "visual_tokens_before"]  # fmt: skip
    assert rows["none"]["steady_videos_per_min"] > 0
    note = "recipe 'nope' is neither registered in this installation nor a YAML file: skipped"
    assert note in results["meta"]["notes"]
    assert (out / "results.png").stat().st_size > 0 and "| local-w1 | storm |" in (out / "results.md").read_text()


def _bundled_video_model() -> bool:
    from vtr.models import bundled_model_dir

    config = bundled_model_dir("video") / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.startswith(("Qwen2VL", "Qwen2_5_VL", "LlavaOnevision")) for a in archs)


@pytest.mark.skipif(
    not ((ROOT / "assets" / "videos").is_dir() and _bundled_video_model()),
    reason="the bundled video model and assets/videos/ have not landed yet (the bundled model reads images only)",
)
def test_bundled_model_captions_the_bundled_clips_offline(tmp_path, capsys):
    """The issue's acceptance command: `vtr caption assets/videos --out captions.jsonl --recipe storm`."""
    out = tmp_path / "captions.jsonl"
    argv = ["caption", str(ROOT / "assets" / "videos"), "--out", str(out), "--recipe", "storm", "--no-progress"]
    assert main(argv) == 0
    records = read_records(out)
    videos = find_videos(str(ROOT / "assets" / "videos"))
    assert sorted(r["path"] for r in records) == videos
    assert all(r["error"] is None and r["caption"] for r in records)
    assert all(r["visual_tokens_after"] < r["visual_tokens_before"] for r in records)
    assert all(r["model"].startswith("bundled:") and r["recipe"] == "storm" for r in records)
    assert f"{len(videos)} captioned, 0 failed" in capsys.readouterr().err
