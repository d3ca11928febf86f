"""The model side of the demo: one loaded model answers both sides, streamed and measured (no Gradio here).

:class:`DemoEngine` owns the model and a lock. :meth:`DemoEngine.run` answers a :class:`DemoRequest` twice
with the SAME model instance: first as loaded (baseline), then inside ``vtr.reduced(model, recipe, ...)``,
which wraps the instance for that block only and restores it afterwards. Each side streams its text as it
is generated and records time to first token, total time and peak memory; the reduced side also yields
the report (tokens per stage, kept indices) and the image layouts the overlays are drawn from.

Requests are checked before the model is touched (:func:`make_request`): upload type, size and
readability, prompt, recipe and budget, generation limits. Problems raise :class:`DemoError`, whose
message the UI shows as is.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import vtr
from vtr import recipes
from vtr.demos.figures import SideResult
from vtr.demos.geometry import ViewInputs
from vtr.report import Report
from vtr.tokens import ImageLayout

__all__ = [
    "IMAGE_TYPES",
    "VIDEO_TYPES",
    "DemoEngine",
    "DemoError",
    "DemoRequest",
    "PeakMemory",
    "Update",
    "UploadLimits",
    "check_upload",
    "make_request",
    "parse_budget",
]

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_TYPES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
BUDGET_MODES = ("recipe default", "ratio", "count")
MAX_PROMPT_CHARS = 2000


class DemoError(ValueError):
    """A problem with the user's request; its message is shown in the UI as is."""


@dataclass(frozen=True)
class UploadLimits:
    """Upload and generation limits of one demo server.

    Attributes:
        image_mb, video_mb: largest accepted file per kind, in MiB.
        max_side: largest accepted image side in pixels (decoding a huge image costs memory before any check).
        max_frames: most video frames a request may sample.
        max_new_tokens: most tokens a request may generate per side.
    """

    image_mb: float = 20.0
    video_mb: float = 100.0
    max_side: int = 8192
    max_frames: int = 64
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("image_mb", "video_mb", "max_side", "max_frames", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"UploadLimits.{name} must be > 0, got {getattr(self, name)!r}")


def check_upload(path: str | Path | None, limits: UploadLimits) -> str:
    """Check an uploaded file: its type (by extension), size and that it decodes. Returns ``"image"`` or ``"video"``.

    Raises:
        DemoError: naming the file and what is wrong (type, size, corrupt content), with the allowed values.
    """
    if path is None or str(path) == "":
        raise DemoError("no image or video: upload one or pick an example")
    p = Path(path)
    ext = p.suffix.lower()
    if ext in IMAGE_TYPES:
        kind, limit = "image", limits.image_mb
    elif ext in VIDEO_TYPES:
        kind, limit = "video", limits.video_mb
    else:
        raise DemoError(
            f"unsupported file type {ext or '(none)'!r} ({p.name}): upload an image ({', '.join(IMAGE_TYPES)}) "
            f"or a video ({', '.join(VIDEO_TYPES)})"
        )
    if not p.is_file():
        raise DemoError(f"{p.name}: the uploaded file is missing on the server; upload it again")
    size_mb = p.stat().st_size / 2**20
    if size_mb > limit:
        raise DemoError(f"{p.name} is {size_mb:.1f} MB; the limit for {kind}s is {limit:g} MB")
    if kind == "image":
        _check_image(p, limits)
    else:
        _check_video(p)
    return kind


def _check_image(p: Path, limits: UploadLimits) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:  # reads the header only: the size is known before decoding
            w, h = im.size
            if max(w, h) > limits.max_side:
                raise DemoError(f"{p.name} is {w}x{h} pixels; the limit is {limits.max_side} pixels per side")
            im.load()
    except DemoError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoError(f"{p.name} is not a valid image file ({type(exc).__name__}: {exc})") from exc


def _check_video(p: Path) -> None:
    from vtr.video import read_video

    try:
        read_video(p, num_frames=1)
    except (ValueError, OSError) as exc:  # VideoError is a ValueError and names the file
        raise DemoError(f"{p.name} is not a readable video: {exc}") from exc


def parse_budget(mode: str, value: float | int | None) -> int | float | None:
    """The ``keep`` override from the UI: ``None`` (recipe default), a ratio in (0, 1] or a count >= 1."""
    if mode not in BUDGET_MODES:
        raise DemoError(f"budget mode must be one of {BUDGET_MODES}, got {mode!r}")
    if mode == "recipe default":
        return None
    if value is None:
        raise DemoError(f"enter a budget {mode}: a ratio in (0, 1] or a token count >= 1")
    if mode == "ratio":
        if not 0 < float(value) <= 1:
            raise DemoError(f"a budget ratio must lie in (0, 1], got {value:g}")
        return float(value)
    if float(value) != int(value) or int(value) < 1:
        raise DemoError(f"a budget count must be a whole number >= 1, got {value:g}")
    return int(value)


@dataclass(frozen=True)
class DemoRequest:
    """One validated request: the same media and prompt answered baseline and reduced."""

    path: str
    kind: str  # "image" | "video"
    prompt: str
    recipe: str
    overrides: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 32
    frames: int = 8


def make_request(
    engine: DemoEngine,
    path: str | None,
    prompt: str | None,
    recipe: str | None,
    budget_mode: str,
    budget_value: float | None,
    max_new_tokens: float | None,
    frames: float | None,
    limits: UploadLimits,
) -> DemoRequest:
    """Validate the UI's values into a :class:`DemoRequest` (raises :class:`DemoError` naming the problem)."""
    kind = check_upload(path, limits)
    if kind == "video" and not engine.supports_video:
        raise DemoError(
            f"this model ({engine.family}) does not take videos: upload an image, or start the demo with a "
            "video model (vtr demo --model ...)"
        )
    text = (prompt or "").strip()
    if not text:
        raise DemoError("enter a prompt (a question or an instruction about the image or video)")
    if len(text) > MAX_PROMPT_CHARS:
        raise DemoError(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    if recipe not in recipes.names():
        raise DemoError(f"unknown recipe {recipe!r}; available: {', '.join(recipes.names())}")
    keep = parse_budget(budget_mode, budget_value)
    overrides = {} if keep is None else {"keep": keep}
    try:
        recipes.build(recipe, **overrides)
    except (ValueError, TypeError) as exc:
        raise DemoError(f"recipe {recipe!r}: {exc}") from exc
    n_new = _whole(max_new_tokens, "max new tokens", 1, limits.max_new_tokens)
    n_frames = _whole(frames, "frames", 1, limits.max_frames)
    return DemoRequest(str(path), kind, text, recipe, overrides, n_new, n_frames)


def _whole(value: float | None, name: str, lo: int, hi: int) -> int:
    if value is None or float(value) != int(value) or not lo <= int(value) <= hi:
        raise DemoError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------- measuring
def _proc_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """``malloc_trim(0)`` on glibc (no-op elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocations on a GPU, process RSS on the CPU (Linux).

    On the CPU the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs``; where
    that is not possible :attr:`peak_bytes` stays ``None`` (shown as n/a, never a made-up figure).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.peak_bytes: int | None = None
        self._start = 0
        self._ok = False

    @property
    def label(self) -> str:
        return "peak CUDA memory above start" if self.cuda else "peak process RSS above start"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start, self._ok = torch.cuda.memory_allocated(self.device), True
            return self
        _malloc_trim()  # hand freed heap back to the OS, so this side's growth is not hidden by the last one's
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return self
        start = _proc_kib("VmRSS")
        self._start, self._ok = (start or 0) * 1024, start is not None
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._ok:
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_kib("VmHWM")
            if hwm is None:
                return
            peak = hwm * 1024
        self.peak_bytes = max(0, int(peak) - self._start)


class _TokenStream:
    """A ``generate`` streamer: skips the prompt, queues new token ids, stamps the first one."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self.first: float | None = None
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate sends the prompt ids first
            self._prompt = False
            return
        if self.first is None:
            self.first = time.perf_counter()
        self.queue.put([int(v) for v in value.reshape(-1).tolist()])

    def end(self) -> None:
        self.queue.put(None)


class _Cancel:
    """Stopping criterion that ends generation once ``event`` is set (the page went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Update:
    """One step of :meth:`DemoEngine.run`: texts so far and, once a side is done, its results.

    ``phase`` is ``"baseline"`` or ``"reduced"`` while streaming and ``"done"`` at the end, when ``report``,
    ``layouts``, ``family`` and ``views`` describe the reduced call.
    """

    phase: str
    base_text: str = ""
    red_text: str = ""
    base: SideResult | None = None
    red: SideResult | None = None
    report: Report | None = None
    layouts: list[ImageLayout] | None = None
    views: ViewInputs | None = None
    memory_label: str = ""
    recipe_text: str = ""


# ----------------------------------------------------------------------------------------------- the engine
class DemoEngine:
    """One loaded model and its processor, serving baseline and reduced answers in turn (thread-safe)."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, name: str = "model"):
        from vtr.adapters import adapter_for

        adapter = adapter_for(model)  # a clear TypeError for unsupported models, before any request
        if vtr.is_wrapped(model):
            raise ValueError("DemoEngine needs the model unwrapped: its baseline side runs the model as loaded")
        self.model = model
        self.processor = processor
        self.name = name
        self.family = adapter.name
        self.supports_video = bool(adapter.supports_video) and getattr(processor, "video_processor", None) is not None
        self.device = next(model.parameters()).device
        gen = getattr(model.generation_config, "max_new_tokens", None)
        self.default_max_new_tokens = int(gen) if gen else 32
        self._lock = threading.Lock()
        # One long-lived generation thread: its stack and malloc arena are reused by every call, so the
        # CPU peak-memory figure measures the call, not a fresh thread's set-up.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vtr-demo-generate")

    @classmethod
    def load(cls, model: str | None = None, *, dtype: str = "float32", device: str = "cpu") -> DemoEngine:
        """Load ``model`` (a Hugging Face id or path; ``None``: the bundled tiny model) with ``load_model``."""
        from vtr.models import load_model

        try:
            m, p = load_model(model, dtype=dtype, device=device)
        except (OSError, ValueError) as exc:  # missing files, unknown hub id, no network, bad config
            text = " ".join(str(exc).split())  # Hugging Face messages span lines; the CLI prints one
            raise ValueError(f"cannot load model {model!r}: {text[:400]}") from exc
        return cls(m.eval(), p, name=model or "bundled tiny model")

    # ------------------------------------------------------------------ inputs
    def prepare(self, req: DemoRequest) -> tuple[Any, Any]:
        """Processor inputs on the model's device and the media they came from (picture or ``[T, H, W, 3]`` frames)."""
        if req.kind == "image":
            from vtr.media import load_image

            image = load_image(req.path)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": req.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=[image], text=[text], return_tensors="pt")
            return inputs.to(self.device), image
        from vtr.video import read_video, usable_frames, video_inputs

        clip = read_video(req.path, num_frames=req.frames)
        n = usable_frames(self.processor, clip)
        inputs = video_inputs(self.processor, [clip], [req.prompt])
        return inputs.to(self.device), clip.frames[:n]

    def warmup(self) -> None:
        """One short generation on a grey picture, so the first request's baseline pays no first-call costs."""
        from PIL import Image

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "warm up"}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        inputs = self.processor(images=[image], text=[text], return_tensors="pt").to(self.device)

        def work() -> None:
            with torch.inference_mode():
                self.model.generate(**inputs, max_new_tokens=1, do_sample=False)

        with self._lock:
            self._worker.submit(work).result()

    # ------------------------------------------------------------------ answering
    def _decode(self, ids: list[int]) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return tok.decode(ids, skip_special_tokens=True).strip()

    def _stream(
        self, inputs: Any, max_new_tokens: int, cancel: threading.Event
    ) -> Iterator[tuple[str, SideResult | None, PeakMemory]]:
        """Generate in the worker thread; yield ``(text so far, None)`` per token, then ``(text, result)``.

        Closing the iterator early stops generation and waits for the worker, so the model is never left
        running when the caller unwraps it.
        """
        from transformers import StoppingCriteriaList

        streamer = _TokenStream()
        stop = threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancel(stop)]),
                    )
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
            finally:
                streamer.end()

        ids: list[int] = []
        meter = PeakMemory(self.device)
        future: Future | None = None
        try:
            with meter:
                t0 = time.perf_counter()
                future = self._worker.submit(work)
                while True:
                    if cancel.is_set():
                        stop.set()
                    try:
                        item = streamer.queue.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if item is None:
                        break
                    ids += item
                    yield self._decode(ids), None, meter
                future.result()
                total = time.perf_counter() - t0
            if errors:
                raise errors[0]
            ttft = None if streamer.first is None else streamer.first - t0
            text = self._decode(ids)
            yield text, SideResult(text, len(ids), ttft, total, meter.peak_bytes), meter
        finally:
            stop.set()
            if future is not None:
                future.result()

    def run(self, req: DemoRequest, cancel: threading.Event | None = None) -> Iterator[Update]:
        """Answer ``req`` baseline then reduced with the one loaded model; yield an :class:`Update` per token.

        Holds the engine lock for the whole request: two requests never interleave on the model.
        """
        cancel = cancel or threading.Event()
        with self._lock:
            if vtr.is_wrapped(self.model):  # only this method wraps it, and always scoped
                raise RuntimeError("the demo model is wrapped outside a request; refusing to mix results")
            inputs, media = self.prepare(req)
            base: SideResult | None = None
            label = ""
            yield Update("baseline")
            with closing(self._stream(inputs, req.max_new_tokens, cancel)) as stream:
                for text, result, meter in stream:
                    base, label = result, meter.label
                    yield Update("baseline", base_text=text, base=base)
            assert base is not None
            with vtr.reduced(self.model, req.recipe, **req.overrides):
                recipe_text = ", ".join(repr(op) for op in self.model.vtr.recipe.ops)
                red: SideResult | None = None
                yield Update("reduced", base_text=base.answer, base=base, recipe_text=recipe_text)
                with closing(self._stream(inputs, req.max_new_tokens, cancel)) as stream:
                    for text, result, _ in stream:
                        red = result
                        yield Update(
                            "reduced", base_text=base.answer, red_text=text, base=base, recipe_text=recipe_text
                        )
                report = self.model.vtr.report
                layouts = _layouts(self.model, report)
            assert red is not None and report is not None
            yield Update(
                "done",
                base_text=base.answer,
                red_text=red.answer,
                base=base,
                red=red,
                report=report,
                layouts=layouts,
                views=ViewInputs(media=media, inputs=inputs, processor=self.processor),
                memory_label=label,
                recipe_text=recipe_text,
            )


def _layouts(model: torch.nn.Module, report: Report, sample: int = 0) -> list[ImageLayout] | None:
    """The image layouts of ``sample`` in the latest reduced call (from the report when it carries them)."""
    per_sample = getattr(report, "layouts", None)
    if per_sample:
        return list(per_sample[sample])
    spans = getattr(model.vtr.adapter, "last_spans", None)
    return list(spans[sample].layout) if spans else None
