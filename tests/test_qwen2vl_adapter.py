"""Video QA with Qwen2-VL (:class:`tokenmem.adapters.qwen2vl.Qwen2VLVideoQA`): equivalence with plain
``generate`` (tokens and logits), M-RoPE positions after a chunked prefill, temporal-patch metadata, the quarter
budget held while streaming for every evictor, the refused ``positions="shift"``, a tiny Qwen2.5-VL, the CLI.

The model is a tiny random ``Qwen2VLForConditionalGeneration`` built by :mod:`tokenmem.zoo.video_model` (the
shipped model's architecture at a test size) and loaded with the real ``from_pretrained``; the clips are the
shapes task's."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenmem.adapters.qwen2vl import Qwen2VLVideoQA, video_qa
from tokenmem.errors import TokenmemError
from tokenmem.evictor_list import registered
from tokenmem.meta import MODALITIES, PROTECT
from tokenmem.zoo import video_model as vm
from tokenmem.zoo import video_task as task
from video_support import tiny_llava_dir  # noqa: F401  (fixture)

FRAMES = 16
QUESTIONS = [task.QUESTIONS["move"], "Which colour is the circle that flashes, and where does the square go?"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny random Qwen2-VL directory (weights scaled up so that greedy decoding is not tie-prone)."""
    spec = vm.Spec(arch="qwen2vl", **vm.TINY)
    tok = vm.build_tokenizer("qwen2vl")
    model = vm.build_model(spec, tok, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    path = tmp_path_factory.mktemp("qwen2vl")
    vm.save_pretrained(model, tok, spec, path)
    return str(path)


@pytest.fixture(scope="module")
def clips():
    return [c.frames for c in task.clips("heldout", 2, num_frames=FRAMES, size=48)]


def plain_model(path):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def plain_generate(model, inputs, new: int, pad: int):
    with torch.no_grad():
        return model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                              pixel_values_videos=inputs.pixel_values_videos, **inputs.extra, max_new_tokens=new,
                              do_sample=False, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)


def assert_equals_plain_generate(qa, inputs, plain, new: int, chunk):
    """``qa``'s generate under a full memory gives ``plain`` generate's tokens and logits (1e-4); returns the
    reference output."""
    pad = qa.tokenizer.pad_token_id
    reference = plain_generate(plain, inputs, new, pad)
    ours = qa.generate_prompt(qa.prompt_of(inputs), qa.memory(), prefill_chunk=chunk, max_new_tokens=new,
                              pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.logits, reference.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return reference


@pytest.mark.parametrize("evictor,budget,chunk", [("full", None, None), ("full", None, 32), ("sink", 100_000, None),
                                                  ("h2o", 100_000, 32)])
def test_answers_and_logits_equal_plain_generate(qwen_dir, clips, evictor, budget, chunk):
    """Budget >= sequence: the same greedy tokens and logits (within float tolerance) as
    Qwen2VLForConditionalGeneration.generate, for a batch of two clips with questions of different lengths (one
    row left-padded), from the whole prompt and after a prefill in 32-token chunks."""
    qa = Qwen2VLVideoQA(qwen_dir, evictor, budget, frames=FRAMES, prefill_chunk=chunk)
    inputs = qa.encode([qa.load(c) for c in clips], QUESTIONS)
    assert inputs.attention_mask[0].min() == 0  # the shorter question is padded
    reference = assert_equals_plain_generate(qa, inputs, plain_model(qwen_dir), 10, chunk)
    answers = qa.ask_many(clips, QUESTIONS, max_new_tokens=10)
    for row, answer in enumerate(answers):
        assert torch.equal(answer.tokens, reference.sequences[row, inputs.input_ids.shape[1]:])
    assert qa.model.config.text_config._attn_implementation == "tokenmem"
    assert qa.model.config.vision_config._attn_implementation != "tokenmem"


def test_metadata_marks_temporal_patches_and_question(qwen_dir, clips):
    """Video tokens: modality frame, segment = temporal patch (frames 2t, 2t + 1), token = index in the patch;
    the question after the video is protected; the report has one column per temporal patch."""
    qa = Qwen2VLVideoQA(qwen_dir, frames=FRAMES)
    answer = qa.ask(clips[0], QUESTIONS[1], max_new_tokens=3)
    inputs = qa.encode([qa.load(clips[0])], [QUESTIONS[1]])
    patches, per = inputs.frames, inputs.tokens_per_frame
    assert (patches, per, inputs.frames_per_segment) == (FRAMES // 2, 9, 2)
    ids = inputs.input_ids[0]
    video = (ids == qa.video_token_id).nonzero().flatten()
    first = int(video[0])
    assert len(video) == patches * per and int(video[-1]) == first + patches * per - 1
    for layer in answer.memory.layers:
        meta = layer.meta
        position, modality = meta.position[0, 0], meta.modality[0, 0]
        is_video = (position >= first) & (position < first + patches * per)
        assert (modality[is_video] == MODALITIES["frame"]).all() and (modality[~is_video] == MODALITIES["text"]).all()
        offset = position[is_video] - first
        assert meta.segment[0, 0][is_video].tolist() == (offset // per).tolist()
        assert meta.token[0, 0][is_video].tolist() == (offset % per).tolist()
        question = (position > first + patches * per - 1) & (position < len(ids))
        protected = (meta.flags[0, 0] & PROTECT) != 0
        assert protected[question].all() and not protected[~question].any()
    report = answer.report
    assert report.frames == patches and report.frames_per_column == 2 and report.columns_of([0, 1, 5]) == [0, 2]
    assert "per 2-frame patch" in report.table() and report.table().splitlines()[1].split()[:3] == ["patch", "0", "1"]


def test_positions_after_a_chunked_prefill_are_transformers_m_rope(qwen_dir, clips):
    """The chunked prefill feeds get_rope_index's [3, b, q] positions, and records rope_deltas so that generate
    continues the rows as transformers does (text positions + delta, the same on all three axes)."""
    qa = Qwen2VLVideoQA(qwen_dir, frames=FRAMES, prefill_chunk=32)
    inputs = qa.encode([qa.load(c) for c in clips], QUESTIONS)
    prompt = qa.prompt_of(inputs)
    assert prompt.position_ids.shape == (3, 2, prompt.length)
    video = prompt.input_ids[0] == qa.video_token_id
    t, h, w = prompt.position_ids[:, 0, video]
    assert len(set(t.tolist())) == FRAMES // 2 and len(set(h.tolist())) == 3 and len(set(w.tolist())) == 3
    text = ~video & prompt.attention_mask[0].bool()
    assert torch.equal(prompt.position_ids[0, 0, text], prompt.position_ids[1, 0, text])
    assert qa.model.model.rope_deltas.shape == (2, 1)


@pytest.mark.parametrize("evictor", [n for n in registered() if n != "full"])
def test_quarter_budget_holds_while_streaming_32_token_chunks(qwen_dir, clips, evictor):
    """budget=0.25, the prompt fed in 32-token chunks: after every forward call of the language model each layer
    holds at most the budget (+ interval - 1 while decoding); the question stays; the report matches stats()."""
    qa = Qwen2VLVideoQA(qwen_dir, evictor, 0.25, frames=FRAMES, prefill_chunk=32)
    memory = qa.memory()
    worst = []

    def check(*_):  # pyramid and ada share the budget across layers / heads: the total is what is bounded
        stats = memory.stats()
        heads = [len(row) for layer in stats["held_per_head"] for row in layer[:1]]
        limit = (stats["budget"] + memory.interval - 1) * sum(heads)
        worst.append(sum(sum(layer[0]) for layer in stats["held_per_head"]) - limit)

    hook = qa.model.model.language_model.register_forward_hook(check)
    try:
        answer = qa.ask(clips[0], QUESTIONS[0], max_new_tokens=6, memory=memory)
    finally:
        hook.remove()
    stats = memory.stats()
    assert len(worst) > 5 and max(worst) <= 0, worst
    assert stats["evictions"] > 0 and stats["seen"] > 4 * stats["budget"] * 0.9
    valid = answer.report.kept.sum(-1) + answer.report.text
    assert valid.tolist() == [layer[0] for layer in stats["held_per_head"]]


def test_shift_positions_are_refused(qwen_dir):
    with pytest.raises(TokenmemError, match="multimodal RoPE"):
        Qwen2VLVideoQA(qwen_dir, "sink", 64, positions="shift")


def test_video_qa_picks_the_adapter_by_model_type(qwen_dir, tiny_llava_dir):  # noqa: F811
    from tokenmem.adapters import VideoQA

    assert type(video_qa(qwen_dir)) is Qwen2VLVideoQA
    assert type(video_qa(tiny_llava_dir)) is VideoQA
    with pytest.raises(TokenmemError, match="use tokenmem.adapters.qwen2vl.Qwen2VLVideoQA"):
        VideoQA(qwen_dir)
    with pytest.raises(TokenmemError, match="Qwen2-VL or Qwen2.5-VL"):
        Qwen2VLVideoQA(VideoQA(tiny_llava_dir).model, tokenizer=object(), preprocessor=object())


def test_cli_video_qa_runs_qwen2vl(qwen_dir, clips, tmp_path, capsys):
    from tokenmem.adapters.video_io import write_video
    from tokenmem.cli import main

    video = write_video(str(tmp_path / "clip.mp4"), clips[0], fps=8)
    code = main(["video-qa", "--model", qwen_dir, "--video", video, "--question", QUESTIONS[0], "--frames", "16",
                 "--evictor", "h2o", "--budget", "0.25", "--evict-unit", "frame", "--prefill-chunk", "32",
                 "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "memory: evictor=h2o" in out and "kept tokens per 2-frame patch" in out


def test_tiny_qwen2_5_vl_equals_plain_generate(qwen_dir, clips):
    """A tiny random Qwen2_5_VLForConditionalGeneration (window attention in its vision tower) through the same
    adapter: the same greedy tokens and logits as its generate, whole prompt and chunked prefill."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tokenmem.adapters.qwen2vl_frames import Qwen2VLFramePreprocessor
    from tokenmem.zoo.qwen2vl_model import MROPE_SECTION, frame_config

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": list(MROPE_SECTION)},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    plain = copy.deepcopy(model)
    for chunk in (None, 32):
        qa = Qwen2VLVideoQA(copy.deepcopy(model), "full", tokenizer=tok,
                            preprocessor=Qwen2VLFramePreprocessor(**frame_config()), chat_template=tok.chat_template,
                            prefill_chunk=chunk)
        inputs = qa.encode([qa.load(c) for c in clips], QUESTIONS)
        assert_equals_plain_generate(qa, inputs, plain, 8, chunk)


def test_packed_training_rows_give_the_logits_of_generate(qwen_dir):
    """The trainer's packed rows (three questions sharing one video, M-RoPE positions from get_rope_index, answers
    one position on from the prompt's last token) give, at every answer token, the logits that Qwen2VLVideoQA's
    generate gives when it is forced along the same answer: the model trains on what it answers at inference."""
    from transformers import LogitsProcessor, LogitsProcessorList

    spec = vm.Spec(arch="qwen2vl", **vm.TINY)
    qa = Qwen2VLVideoQA(qwen_dir, "full", frames=FRAMES)
    encoder = vm.Encoder(qa.tokenizer, spec, qa.model)
    clips = task.clips("train", 2, num_frames=FRAMES, size=48)
    inputs, labels = encoder.packed(clips)
    with torch.no_grad():
        packed = qa.model(**inputs).logits[:, :-1][labels[:, 1:] != -100]  # [answer tokens, vocab]

    class Force(LogitsProcessor):
        def __init__(self, tokens):
            self.tokens, self.step = tokens, 0

        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[self.step]] = 0
            self.step += 1
            return forced

    forced = []
    for clip in clips:
        for kind, question in task.QUESTIONS.items():
            answer = encoder.answers[clip.answer(kind)]
            prompt = qa.prompt_of(qa.encode([qa.load(clip.frames)], [question]))
            out = qa.generate_prompt(prompt, qa.memory(), max_new_tokens=len(answer), output_logits=True,
                                     return_dict_in_generate=True, logits_processor=LogitsProcessorList([Force(answer)]))
            assert out.sequences[0, prompt.length:].tolist() == answer
            forced += [step[0] for step in out.logits]
    torch.testing.assert_close(packed, torch.stack(forced), rtol=1e-4, atol=1e-4)


def test_trainer_runs_the_qwen2vl_architecture(tmp_path):
    """``train_video --arch qwen2vl`` trains, saves a from_pretrained directory of a Qwen2-VL with the asked vision
    depth and M-RoPE sections, and evaluates it through Qwen2VLVideoQA; an M-RoPE section without it is refused."""
    import json

    from tokenmem.zoo.train_video import main

    final = main(["--arch", "qwen2vl", "--tiny", "--out", str(tmp_path / "run"), "--max-steps", "3", "--threads", "1",
                  "--quiet", "--eval-minutes", "100", "--final-clips", "2", "--vision-layers", "2",
                  "--mrope-section", "2", "3", "11"])
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["vision_config"]["depth"] == 2
    assert config["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 11]
    card = json.loads((final / "training.json").read_text())
    assert card["steps"] == 3 and card["spec"]["arch"] == "qwen2vl" and card["video_tokens_per_clip"] == 72
    assert set(card["heldout_accuracy_full_cache"]) >= set(task.QUESTIONS)
    assert type(video_qa(str(final))) is Qwen2VLVideoQA
    with pytest.raises(TokenmemError, match="add --arch qwen2vl"):
        main(["--tiny", "--out", str(tmp_path / "llava"), "--max-steps", "1", "--mrope-section", "2", "3", "11"])


@pytest.mark.parametrize("chunk", [None, 32], ids=["whole-prompt", "prefill-chunks-of-32"])
def test_shipped_qwen2vl_model_equals_plain_generate(chunk):
    """The shipped shapes-qwen2vl-video model, a batch of two held-out clips with two questions (one row
    left-padded): Qwen2VLVideoQA with the full cache gives plain generate's answer tokens and logits, and the
    answers are the clips' truths."""
    from tokenmem.zoo import video_qwen2vl_path

    path = str(video_qwen2vl_path())
    shapes = task.clips("heldout", 2, num_frames=24, size=48)
    questions = [task.QUESTIONS["circle"], task.QUESTIONS["move"]]
    qa = Qwen2VLVideoQA(path, "full", frames=24, prefill_chunk=chunk)
    inputs = qa.encode([qa.load(c.frames) for c in shapes], questions)
    assert inputs.attention_mask.min() == 0
    reference = assert_equals_plain_generate(qa, inputs, plain_model(path), 6, chunk)
    said = qa.tokenizer.batch_decode(reference.sequences[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    assert [s.strip() for s in said] == [shapes[0].answer("circle"), shapes[1].answer("move")]
