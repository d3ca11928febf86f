"""vtr.video: reading videos (decord), sampling frames and building model inputs for the video families."""

from vtr.video.inputs import frames_per_step, tokens_per_frame, usable_frames, video_inputs, video_messages
from vtr.video.io import Clip, VideoError, read_video, sample_indices

__all__ = [
    "Clip",
    "VideoError",
    "frames_per_step",
    "read_video",
    "sample_indices",
    "tokens_per_frame",
    "usable_frames",
    "video_inputs",
    "video_messages",
]
