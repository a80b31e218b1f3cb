"""Video question answering with Qwen2-VL under a bounded memory.

Without arguments it asks the shipped ``shapes-qwen2vl-video`` model (a Qwen2VLForConditionalGeneration trained
here) the three questions of a held-out clip of the shapes task, with the full cache and with h2o and the
language-trained NAMM scorer at 25% of the tokens, the prompt streamed in 32-token chunks; it prints the answers and
which temporal patches (2 frames each) every memory kept. With a real local checkpoint (Qwen2-VL or Qwen2.5-VL) and
a video:

    python examples/qwen2vl_video_qa.py [--model PATH --video FILE --question "..."] [--frames 16] [--plot kept.png]
"""

import argparse

from tokenmem.adapters.qwen2vl import Qwen2VLVideoQA
from tokenmem.plugins.namm import NAMM
from tokenmem.zoo import video_qwen2vl_path, video_task

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="a local Qwen2-VL / Qwen2.5-VL directory (default: the shipped one)")
parser.add_argument("--video", default=None, help="a video file (default: a held-out clip of the shapes task)")
parser.add_argument("--question", default=None)
parser.add_argument("--frames", type=int, default=24)
parser.add_argument("--plot", default=None, help="heat map of what NAMM kept per layer and temporal patch (PNG)")
args = parser.parse_args()

model = args.model or str(video_qwen2vl_path())
if args.video:
    videos, questions, truth = [args.video], [args.question or "What is moving in this video?"], [None]
else:
    clip = video_task.make_clip(video_task.heldout_seed(0))
    videos = [clip.frames] * len(video_task.QUESTIONS)
    questions, truth = list(video_task.QUESTIONS.values()), [clip.answer(k) for k in video_task.QUESTIONS]

qa = None
for evictor, budget in [("full", None), ("h2o", 0.25), (NAMM.pretrained("language"), 0.25)]:
    if qa is None:  # load once, then reuse the model for every memory
        qa = Qwen2VLVideoQA(model, evictor, budget, frames=args.frames, prefill_chunk=32)
    else:
        qa = Qwen2VLVideoQA(qa.model, evictor, budget, tokenizer=qa.tokenizer, preprocessor=qa.preprocessor,
                            chat_template=qa.chat_template, frames=args.frames, prefill_chunk=32)
    answers = qa.ask_many(videos, questions, max_new_tokens=8)
    name = evictor if isinstance(evictor, str) else "namm (language scorer)"
    print(f"== {name} (budget {budget}):", [a.text.strip() for a in answers], "truth:", truth)
    print(answers[0].memory.summary())
    print(answers[0].report.table(), "\n")
    if args.plot and not isinstance(evictor, str):
        answers[0].report.plot(args.plot, title="NAMM (language scorer), 25%: share of each temporal patch kept")
        print(f"plot: {args.plot}")
