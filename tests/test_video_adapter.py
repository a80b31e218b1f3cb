"""Video QA with LLaVA-NeXT-Video: equivalence with plain generate, frame metadata, bounded memory, the
kept-token report, the CLI. The model is a tiny random LLaVA-NeXT-Video loaded with the real from_pretrained."""

import pytest
import torch

from tokenmem.adapters import VideoError, VideoQA, read_video
from tokenmem.meta import MODALITIES, PROTECT
from video_support import shape_videos, tiny_llava_dir  # noqa: F401  (fixtures)

FRAME, TEXT = MODALITIES["frame"], MODALITIES["text"]
QUESTIONS = ["What is moving?", "Which way does the blue ball go, and does it stop?"]


def plain_model(path):
    from transformers import LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("evictor,budget,chunk", [("full", None, None), ("sink", 100_000, None), ("h2o", 100_000, 37)])
def test_answers_equal_plain_generate(tiny_llava_dir, shape_videos, evictor, budget, chunk):  # noqa: F811
    """Budget >= sequence: the same greedy tokens as LlavaNextVideoForConditionalGeneration.generate, for a
    batch of two videos (different sizes) with different questions (so one row is left-padded)."""
    qa = VideoQA(tiny_llava_dir, evictor, budget, frames=8, prefill_chunk=chunk)
    answers = qa.ask_many(shape_videos, QUESTIONS, max_new_tokens=12)
    clips = [read_video(v, 8) for v in shape_videos]
    inputs = qa.encode(clips, QUESTIONS)
    assert inputs.attention_mask[0].min() == 0  # the shorter question is padded
    with torch.no_grad():
        plain = plain_model(tiny_llava_dir).generate(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
            pixel_values_videos=inputs.pixel_values_videos, max_new_tokens=12, do_sample=False,
            pad_token_id=qa.tokenizer.pad_token_id)
    new = plain[:, inputs.input_ids.shape[1]:]
    assert new.shape[1] == 12
    for row, answer in enumerate(answers):
        assert torch.equal(answer.tokens, new[row])
    # only the language model was switched to the tokenmem attention
    assert qa.model.config.text_config._attn_implementation == "tokenmem"
    assert qa.model.config.vision_config._attn_implementation != "tokenmem"


def test_metadata_marks_frames_and_question(tiny_llava_dir, shape_videos):  # noqa: F811
    qa = VideoQA(tiny_llava_dir, frames=8)
    answer = qa.ask(shape_videos[0], QUESTIONS[1], max_new_tokens=4)
    inputs = qa.encode([read_video(shape_videos[0], 8)], [QUESTIONS[1]])
    ids = inputs.input_ids[0]
    video_slots = (ids == qa.video_token_id).nonzero().flatten()
    first, tpf = int(video_slots[0]), qa.tokens_per_frame
    assert tpf == 16 and len(video_slots) == 8 * tpf and int(video_slots[-1]) == first + 8 * tpf - 1
    for layer in answer.memory.layers:
        meta = layer.meta
        position, modality = meta.position[0, 0], meta.modality[0, 0]
        assert position.tolist() == list(range(len(ids) + 3))  # full memory: every token, in order
        video = (position >= first) & (position < first + 8 * tpf)
        assert (modality[video] == FRAME).all() and (modality[~video] == TEXT).all()
        offset = position[video] - first
        assert meta.segment[0, 0][video].tolist() == (offset // tpf).tolist()
        assert meta.token[0, 0][video].tolist() == (offset % tpf).tolist()
        assert meta.token[0, 0][: first].tolist() == ids[:first].tolist()  # text keeps its input ids
        protected = meta.is_protected[0, 0]
        question = (position > first + 8 * tpf - 1) & (position < len(ids))
        assert protected[question].all() and not protected[~question].any()
    tail = qa.tokenizer.decode(ids[first + 8 * tpf:])
    assert QUESTIONS[1] in tail and tail.rstrip().endswith("ASSISTANT:")


@pytest.mark.parametrize("evictor", ["sink", "h2o", "namm"])
@pytest.mark.parametrize("unit", ["token", "frame"])
def test_quarter_budget_at_32_frames(tiny_llava_dir, shape_videos, evictor, unit):  # noqa: F811
    full = VideoQA(tiny_llava_dir, frames=32).ask(shape_videos[0], QUESTIONS[0], max_new_tokens=8)
    qa = VideoQA(tiny_llava_dir, evictor, 0.25, frames=32, evict_unit=unit, interval=16)
    answer = qa.ask(shape_videos[0], QUESTIONS[0], max_new_tokens=8)
    stats, full_stats = answer.memory.stats(), full.memory.stats()
    assert stats["seen"] == full_stats["seen"]
    per_token = full_stats["kv_bytes"] / (full_stats["seen"] * len(full_stats["held"]))
    assert stats["kv_bytes"] <= 0.25 * full_stats["kv_bytes"] + 16 * per_token * len(stats["held"])
    assert stats["evictions"] > 0
    report = answer.report
    # the report and stats() describe the same memory: its slots, and the valid tokens of each head (NAMM masks)
    assert report.held.tolist() == [[h] * report.held.shape[1] for h in stats["held_slots"]]
    valid = report.kept.sum(-1) + report.text  # [layers, kv_heads]
    assert valid.tolist() == [layer[0] for layer in stats["held_per_head"]]
    assert stats["kv_bytes"] == int(valid.sum() * per_token / valid.shape[1])
    ids = qa.encode([answer.clip], [QUESTIONS[0]]).input_ids[0]
    first = int((ids == qa.video_token_id).nonzero()[0])
    question_tokens = len(ids) - (first + 32 * qa.tokens_per_frame)
    for i, layer in enumerate(answer.memory.layers):
        meta = layer.meta
        for h in range(meta.position.shape[1]):
            kept = meta.valid[0, h] & (meta.modality[0, h] == FRAME)
            frames_by_position = (meta.position[0, h][kept] - first) // qa.tokens_per_frame
            assert torch.bincount(frames_by_position, minlength=32).tolist() == report.kept[i, h].tolist()
            if unit == "frame":
                assert set(report.kept[i, h].tolist()) <= {0, qa.tokens_per_frame}
            question = meta.valid[0, h] & ((meta.flags[0, h] & PROTECT) != 0)
            assert int(question.sum()) == question_tokens > 3  # the protected question is all there
    assert 0 < int(report.kept.sum()) < 32 * qa.tokens_per_frame * report.kept.shape[0] * report.kept.shape[1]


def test_cli_video_qa_prints_answer_summary_table_and_plot(tiny_llava_dir, shape_videos, tmp_path, capsys):  # noqa: F811
    from tokenmem.cli import main

    plot = tmp_path / "kept.png"
    code = main(["video-qa", "--model", tiny_llava_dir, "--video", shape_videos[1], "--question", "What moves?",
                 "--frames", "16", "--evictor", "h2o", "--budget", "0.25", "--evict-unit", "frame",
                 "--max-new-tokens", "4", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory: evictor=h2o" in out and "16 of 48 frames" in out
    table = out[out.index("kept tokens per frame"):].splitlines()
    assert table[1].split()[:3] == ["frame", "0", "1"] and len(table[1].split()) == 1 + 16 + 2
    assert table[2].startswith("   layer 0") and table[3].startswith("   layer 1")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(["video-qa", "--model", tiny_llava_dir, "--video", str(tmp_path / "missing.mp4"), "--question", "?"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_bad_input_is_reported(tiny_llava_dir, shape_videos, tmp_path):  # noqa: F811
    with pytest.raises(VideoError, match="use at most 48 frames"):
        VideoQA(tiny_llava_dir, frames=64).ask(shape_videos[0], "?")
    with pytest.raises(Exception, match="not a local directory"):
        VideoQA(str(tmp_path / "nothing"))
    qa = VideoQA(tiny_llava_dir, frames=8)
    with pytest.raises(Exception, match="same number of frames"):
        qa.ask_many([read_video(shape_videos[0], 8), read_video(shape_videos[1], 6)], ["a?", "b?"])
    with pytest.raises(Exception, match="evict_unit must be one of"):
        VideoQA(tiny_llava_dir, evict_unit="segment")
