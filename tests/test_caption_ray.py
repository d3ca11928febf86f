"""The Ray Data engine of ``vtr caption`` on a local 2-CPU Ray instance (started once for this module).

Skipped, with the reason, only when Ray is not installed or cannot start on this machine.
"""

from __future__ import annotations

import pytest
from caption_testutil import make_video_folder, read_records, save_tiny_video_model

from vtr.video.caption import CaptionConfig, caption_videos

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "vtr[ray]" to test --engine ray')


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Ray cannot start a local instance here: {type(exc).__name__}: {exc}")
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-caption")
    return {"model": save_tiny_video_model(root / "model"), "videos": make_video_folder(root / "v", n_good=5),
            "root": root}  # fmt: skip


def _config(setup, out, **kw) -> CaptionConfig:
    base = dict(input=str(setup["root"] / "v"), out=str(out), model=str(setup["model"]), recipe="pool", keep=0.25,
                frames=4, batch_size=2, workers=1)  # fmt: skip
    return CaptionConfig(**{**base, **kw})


def _key(record: dict) -> tuple:
    return (record["path"], record["caption"], record["error"] is None, record["frames"],
            record["visual_tokens_before"], record["visual_tokens_after"], record["recipe"])  # fmt: skip


def test_ray_engine_gives_the_local_records_and_resumes(setup, ray_cluster, tmp_path):
    assert ray_cluster["CPU"] == 2
    local_out = tmp_path / "local.jsonl"
    caption_videos(_config(setup, local_out), progress=False, log=lambda _: None)
    local = {r["path"]: r for r in read_records(local_out)}
    assert len(local) == 8

    # Start with two videos already recorded (as after an interrupted run), then caption the rest on Ray
    # with 2 model actors on 2 CPUs (the actors must leave a CPU to the decode tasks, or nothing progresses).
    out = tmp_path / "ray.jsonl"
    done = sorted(local)[:2]
    out.write_text("".join(local_out.read_text().splitlines(keepends=True)[i] for i in range(8)
                           if read_records(local_out)[i]["path"] in done))  # fmt: skip
    notes: list[str] = []
    summary = caption_videos(_config(setup, out, engine="ray", num_actors=2), progress=False, log=notes.append)
    records = read_records(out)
    assert [r["path"] for r in records[:2]] == [p for p in local if p in done]
    assert len(records) == len({r["path"] for r in records}) == 8  # exactly one record per video
    assert (summary.skipped, summary.captioned + summary.failed) == (2, 6)
    assert {_key(r) for r in records} == {_key(r) for r in local.values()}  # same records as the local engine
    assert sum(r["error"] is not None for r in records) == 3
    assert "skipped" in notes[-1]

    # A rerun on Ray does nothing.
    summary = caption_videos(_config(setup, out, engine="ray"), progress=False, log=lambda _: None)
    assert (summary.skipped, summary.processed) == (8, 0)


def test_ray_pipeline_decodes_outside_the_model_actors(setup, ray_cluster, capsys):
    """Decode tasks and model actors stay separate operators: Ray Data does not fuse decoding into the actors."""
    from vtr.video.caption_decode import make_decode_task
    from vtr.video.caption_ray import build_dataset

    ds = build_dataset(["/x.mp4"], make_decode_task(len, {}, None), {}, _config(setup, "o.jsonl"), gpus=0, cpus=1)
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[Map(_decode_row)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(CaptionActor)]" in optimized


def test_actor_resources():
    from vtr.video.caption_ray import actor_resources

    cfg = CaptionConfig(input="x", out="y", engine="ray", num_actors=2)
    assert actor_resources(cfg, {"CPU": 2.0}) == (0.0, 0.5)  # both actors fit and one CPU stays for decoding
    assert actor_resources(cfg, {"CPU": 16.0, "GPU": 4.0}) == (1.0, 1.0)
    one = CaptionConfig(input="x", out="y", engine="ray", num_gpus_per_actor=0.5, num_cpus_per_actor=3.0)
    assert actor_resources(one, {"CPU": 2.0, "GPU": 1.0}) == (0.5, 3.0)


def test_a_video_that_kills_its_ray_worker_is_recorded_and_the_run_goes_on(setup, ray_cluster, tmp_path):
    """Ray retries a decode task whose worker dies a bounded number of times, then the driver records the video
    (``error_stage: "ray"``) instead of retrying forever."""
    import caption_testutil
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(caption_testutil)  # the Ray workers cannot import the tests folder
    good = setup["videos"]["good"][:2]
    crash = tmp_path / "crash.mp4"
    crash.write_bytes(b"\x00")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*good, str(crash)]) + "\n")
    out = tmp_path / "c.jsonl"
    config = _config(setup, out, input=str(listing), engine="ray")
    summary = caption_videos(config, reader=caption_testutil.crashing_reader, progress=False, log=lambda _: None)
    records = {r["path"]: r for r in read_records(out)}
    assert set(records) == {*good, str(crash)}
    assert records[str(crash)]["error_stage"] == "ray" and "failed on every retry" in records[str(crash)]["error"]
    assert all(records[p]["error"] is None for p in good)
    assert (summary.captioned, summary.failed) == (2, 1)
