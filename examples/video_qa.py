"""Video question answering with a bounded memory (LLaVA-NeXT-Video).

Without arguments it builds a tiny random LLaVA-NeXT-Video and a synthetic video (moving shapes, a still
middle third) in a temporary folder, so the answers are meaningless: watch which frames each evictor keeps.
With a real local checkpoint and a video:

    python examples/video_qa.py [--model PATH --video FILE] [--question "..."] [--frames 32] [--plot kept.png]
"""

import argparse
import sys
import tempfile
from pathlib import Path

from tokenmem.adapters import VideoQA
from tokenmem.adapters.video_io import write_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny model and video fixtures
from video_fixtures import build_tiny_llava_next_video, moving_shapes  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--video", default=None)
parser.add_argument("--question", default="What is moving in this video?")
parser.add_argument("--frames", type=int, default=32)
parser.add_argument("--plot", default=None, help="heat map of the frames h2o kept per layer (PNG)")
args = parser.parse_args()

work = Path(tempfile.mkdtemp(prefix="tokenmem-video-"))
model = args.model or build_tiny_llava_next_video(work / "model")
video = args.video or write_video(work / "shapes.mp4", moving_shapes(64, 48, 64))

for evictor, budget, unit in [("full", None, "token"), ("sink", 0.25, "token"), ("h2o", 0.25, "frame")]:
    qa = VideoQA(model, evictor, budget, frames=args.frames, evict_unit=unit)
    answer = qa.ask(video, args.question, max_new_tokens=16)
    print(f"== {evictor} (budget {budget}, per {unit}): {answer.text!r}")
    print(answer.memory.summary())
    print(answer.report.table(), "\n")
    if args.plot and evictor == "h2o":
        answer.report.plot(args.plot)
        print(f"plot: {args.plot}\n")
