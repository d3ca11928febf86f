"""The Ray Data engine of ``vtr caption`` (``--engine ray``): many decoders and model replicas, one log.

Pipeline (streaming, so decoding, captioning and writing overlap)::

    from_items(paths, one block per video)
      -> map(decode)                         CPU tasks, 1 CPU each, anywhere in the cluster
      -> map_batches(CaptionActor)           ``num_actors`` model replicas, ``batch_size`` videos per call,
                                             ``num_gpus_per_actor`` GPUs each (1 when the cluster has GPUs)
      -> iter_rows() on the driver           the driver appends each record to the log as it streams back

The driver is the only writer, with the same :class:`~vtr.video.caption_log.RecordWriter` as the local
engine, so the JSONL, the lock and the resume semantics are exactly the local engine's: a record is on disk
the moment the driver has it; killing the driver loses only videos in flight, which the rerun redoes.

A Ray task that fails for good (a decoder crash that kills its worker, on every retry) drops only its own
block (``max_errored_blocks``): the driver records such videos as errors once the stream ends. If every
video fails that way the run raises instead of recording them all as failures (a broken installation on the
workers, not bad videos). Workers must have vtr installed (and the model reachable at the same path or id).
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vtr.video.caption_decode import Decoded, make_decode_task
from vtr.video.caption_model import Captioner, error_record, model_label, recipe_label

if TYPE_CHECKING:
    from vtr.video.caption import CaptionConfig

__all__ = ["DECODE_TASK_MEMORY", "DECODE_TASK_RETRIES", "CaptionActor", "actor_resources", "build_dataset", "run_ray"]


#: Memory reserved per decode task (bytes): room for one decoded clip; also keeps decoding a separate stage.
DECODE_TASK_MEMORY = 512 * 1024**2
#: Retries of a decode task whose worker died (Ray Data retries forever by default, so a video that crashes
#: its decoder would stall the run); after them the video is recorded with ``error_stage: "ray"``.
DECODE_TASK_RETRIES = 2


def _decode_row(row: dict[str, Any], task: Callable[[str], Decoded]) -> dict[str, Any]:
    """Ray ``map`` function: ``{"path"}`` -> ``{"path", "item"}`` (the pickled :class:`Decoded`)."""
    return {"path": row["path"], "item": pickle.dumps(task(str(row["path"])), protocol=5)}


class CaptionActor:
    """A model replica in the Ray actor pool: batches of decoded videos in, JSON records out."""

    def __init__(self, captioner_kwargs: dict[str, Any]):
        self.captioner = Captioner(**captioner_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(blob) for blob in batch["item"]]
        records = self.captioner.caption(items)
        return {
            "path": np.array([r["path"] for r in records], dtype=object),
            "record": np.array([json.dumps(r, ensure_ascii=False) for r in records], dtype=object),
        }


def actor_resources(config: CaptionConfig, cluster: dict[str, float]) -> tuple[float, float]:
    """``(num_gpus, num_cpus)`` for one model actor.

    GPUs: ``num_gpus_per_actor``, or 1 when the cluster has any GPU, else 0. CPUs: ``num_cpus_per_actor``,
    or 1 lowered so that all actors together leave at least one CPU free for decode tasks (otherwise a
    small cluster — 2 CPUs, 2 actors — would deadlock with every CPU held by an idle actor waiting for
    input that no decoder can produce).
    """
    gpus = config.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    cpus = config.num_cpus_per_actor
    if cpus is None:
        total = float(cluster.get("CPU", 1.0))
        cpus = min(1.0, max(0.1, (total - 1.0) / config.num_actors))
    return float(gpus), float(cpus)


def build_dataset(
    paths: Sequence[str],
    task: Callable[[str], Decoded],
    captioner_kwargs: dict[str, Any],
    config: CaptionConfig,
    *,
    gpus: float,
    cpus: float,
):
    """The Ray Data pipeline (lazy ``Dataset`` of ``{"path", "record"}`` rows, ``record`` a JSON string).

    Decoding is kept out of the model actors: the decode tasks reserve memory for their clip
    (:data:`DECODE_TASK_MEMORY`), so their resource requests differ from the actors' and Ray Data does not fuse
    the two stages (a fused stage would decode inside the actor, one video after another, between generate
    calls; ``test_caption_ray`` checks the optimized plan).
    """
    import ray.data

    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    with warnings.catch_warnings():
        # max_retries has no named parameter yet; Ray deprecates passing it this way from 2.64 (hence the pin
        # ray<2.64 in the `ray` extra).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ds.map(
            _decode_row,
            fn_kwargs={"task": task},
            num_cpus=1,
            memory=DECODE_TASK_MEMORY,
            max_retries=DECODE_TASK_RETRIES,
        )
    return ds.map_batches(
        CaptionActor,
        fn_constructor_kwargs={"captioner_kwargs": captioner_kwargs},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_gpus=gpus,
        num_cpus=cpus,
    )


def run_ray(
    config: CaptionConfig,
    paths: Sequence[str],
    emit: Callable[[dict[str, Any]], None],
    *,
    reader: Callable[..., Any],
) -> None:
    """Caption ``paths`` on Ray Data and call ``emit(record)`` on the driver once per video.

    Joins ``config.ray_address`` (or an already initialised Ray), else starts a local Ray instance, which
    it shuts down at the end.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError('--engine ray needs Ray Data: pip install "vtr[ray]"') from exc
    started = False
    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False, logging_level="WARNING")
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.max_errored_blocks)
    try:
        ctx.enable_progress_bars = False  # vtr shows one bar of finished videos
        ctx.max_errored_blocks = -1  # a failed block is one video: record it, keep going (see module doc)
        gpus, cpus = actor_resources(config, ray.cluster_resources())
        device = config.device
        if device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
        captioner_kwargs = {
            "model": config.model,
            "recipe": config.recipe,
            "keep": config.keep,
            "prompt": config.prompt,
            "max_new_tokens": config.max_new_tokens,
            "dtype": config.dtype,
            "device": device,
        }
        task = make_decode_task(reader, config.read_kwargs(), config.max_duration)
        ds = build_dataset(paths, task, captioner_kwargs, config, gpus=gpus, cpus=cpus)
        seen: set[str] = set()
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            seen.add(record["path"])
            emit(record)
        missing = [p for p in paths if p not in seen]
        if missing and len(missing) == len(paths):
            raise RuntimeError(
                f"every Ray task failed ({len(paths)} videos, none recorded): check that vtr is installed on the "
                "Ray workers and see the Ray logs above"
            )
        labels = {"recipe": recipe_label(config.recipe, config.keep), "model": model_label(config.model)}
        for path in missing:
            error = "RayTaskFailed: the Ray task for this video failed on every retry (e.g. a decoder crash)"
            emit(error_record(Decoded(path, None, None, 0.0), error, stage="ray", prompt=config.prompt, **labels))
    finally:
        ctx.enable_progress_bars, ctx.max_errored_blocks = saved
        if started:
            ray.shutdown()
