"""Caption candidates and their selection (num_candidates, select) on the transformers backend,
with the tiny random-weight captioners loaded through from_pretrained and real clips."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from stages.base import StageError
from stages.captioners.candidates import CANDIDATES, SELECTION
from stages.registry import stage_class
from tests.stages.captioners.conftest import FAMILIES, record

SAMPLED = dict(temperature=1.0, seed=7, max_new_tokens=12)


def _records(clips):
    return [record(clips[name], rid=name) for name in ("bikes", "moving_h264", "five_frames_mpeg4")]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next_video", "llava_onevision"])
def test_candidate_k_is_the_single_caption_with_seed_plus_k(family, make_captioner, clips):
    """N candidates are N samples with distinct seeds; candidate 0 is what num_candidates: 1 gives."""
    records = _records(clips)
    singles = []
    for k in range(3):
        stage = make_captioner(family, **{**SAMPLED, "seed": 7 + k})
        results = stage.process(records)
        assert all(set(r) == {"text"} for r in results), results  # N=1: no new keys
        singles.append([r["text"] for r in results])
        stage.close()

    stage = make_captioner(family, **SAMPLED, num_candidates=3)
    results = stage.process(records)
    for slot, result in enumerate(results):
        assert not isinstance(result, StageError), result
        assert result[CANDIDATES] == [singles[k][slot] for k in range(3)]
        if family != "llava_next_video":  # its tiny byte vocabulary decodes samples to the same U+FFFDs
            assert len(set(result[CANDIDATES])) == 3, result  # sampled, so distinct
        assert result[SELECTION] == {"method": "first", "index": 0, "reason": "first candidate"}
        assert result["text"] == result[CANDIDATES][0]
    assert stage.take_usage()["caption_samples"] == 3 * len(records)


def test_longest_picks_the_most_characters(make_captioner, clips):
    stage = make_captioner("qwen2_vl", **SAMPLED, num_candidates=4, select="longest")
    for result in stage.process(_records(clips)):
        lengths = [float(len(c)) for c in result[CANDIDATES]]
        selection = result[SELECTION]
        assert selection["method"] == "longest" and selection["scores"] == lengths
        assert result["text"] == result[CANDIDATES][selection["index"]]
        assert len(result["text"]) == max(lengths)


def test_broken_video_is_its_own_error_among_candidates(make_captioner, clips, broken_videos):
    stage = make_captioner("llava_onevision", **SAMPLED, num_candidates=2, select="longest")
    results = stage.process([record(clips["bikes"]), record(broken_videos["garbage"][0]), record(clips["bikes"])])
    assert isinstance(results[1], StageError) and results[1].error_type == "VideoDecodeError"
    for good in (results[0], results[2]):
        assert len(good[CANDIDATES]) == 2 and good["text"] == good[CANDIDATES][good[SELECTION]["index"]]


@pytest.fixture(scope="module")
def digit_judge(tmp_path_factory):
    """A real tiny LM (tests/tiny/text_lm.py) whose generation config lets it write only the
    tokens 1, 2 and 3 (transformers' `suppress_tokens`): a judge that always answers a number,
    which one decided by its random weights and the prompt."""
    from transformers import AutoTokenizer, GenerationConfig

    from tests.tiny.text_lm import build_text_lm

    folder = build_text_lm(tmp_path_factory.mktemp("digit_judge") / "model", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    allowed = {tokenizer.convert_tokens_to_ids(digit) for digit in "123"}
    generation = GenerationConfig.from_pretrained(folder)
    generation.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    generation.save_pretrained(folder)
    return folder


def _judge_stage(make_captioner, judge: dict):
    return make_captioner("qwen2_vl", **SAMPLED, num_candidates=3, select="judge", judge=judge)


def _check_judged(results, answers_asked: list[str] | None = None):
    """Each record is either judged (the index is the first in-range number of the answer) or an
    error that quotes the judge's answer; the random judge decides which, deterministically."""
    for result in results:
        if isinstance(result, StageError):
            assert result.error_type == "JudgeUnparsable", result
            assert "answered" in result.message and "1 to 3" in result.message
            continue
        selection = result[SELECTION]
        numbers = [int(n) for n in re.findall(r"\d+", selection["judge_answer"]) if 1 <= int(n) <= 3]
        assert selection["method"] == "judge" and selection["index"] == numbers[0] - 1
        assert result["text"] == result[CANDIDATES][selection["index"]]


def test_judge_over_the_openai_compatible_server(make_captioner, clips, lm_server, proxy):  # noqa: F811
    judge = dict(backend="openai", model=lm_server.model, base_url=proxy.url, temperature=0, max_tokens=8)
    stage = _judge_stage(make_captioner, judge)
    records = _records(clips)
    results = stage.process(records)
    assert len(proxy.log) == len(records)  # one judge request per clip
    for seen, result in zip(proxy.log, results, strict=True):
        asked = seen.body["messages"][-1]["content"]
        assert "3 candidate captions" in asked and "1 to 3" in asked
        if not isinstance(result, StageError):
            for k, candidate in enumerate(result[CANDIDATES]):
                assert f"{k + 1}. {candidate}" in asked
    _check_judged(results)
    assert stage.take_usage()["judge_requests"] == len(records)


def test_judge_failure_is_the_records_error(make_captioner, clips, lm_server, proxy):  # noqa: F811
    from tests.stages.text.fault_proxy import Fault

    judge = dict(backend="openai", model=lm_server.model, base_url=proxy.url, max_retries=0, temperature=0)
    stage = _judge_stage(make_captioner, judge)
    proxy.plan(Fault.error(503, "judge overloaded"))
    results = stage.process([record(clips["bikes"], rid="a"), record(clips["moving_h264"], rid="b")])
    # the two judge requests go out at once: the 503 falls on whichever reaches the server first
    failed = [r for r in results if isinstance(r, StageError) and "judge failed" in r.message]
    assert len(failed) == 1, results
    assert "503" in failed[0].message or "overloaded" in failed[0].message
    _check_judged([r for r in results if r is not failed[0]])


def test_judge_on_a_local_model_picks_the_number_it_answers(make_captioner, clips, digit_judge):
    judge = dict(
        backend="transformers",
        model=str(digit_judge),
        temperature=0,
        max_tokens=1,
        prompt="Video {id}. Best of {num_candidates}?\n{candidates}",
    )
    stage = _judge_stage(make_captioner, judge)
    results = stage.process(_records(clips))
    assert not any(isinstance(r, StageError) for r in results), results
    _check_judged(results)
    for result in results:
        assert result[SELECTION]["judge_answer"] in {"1", "2", "3"}
        assert result[SELECTION]["judge_model"] == str(digit_judge)


def test_unparsable_judge_answer_is_an_error(make_captioner, clips, text_lm_dir):  # noqa: F811
    judge = dict(backend="transformers", model=str(text_lm_dir), temperature=0, max_tokens=6)
    stage = _judge_stage(make_captioner, judge)
    results = stage.process(_records(clips))
    _check_judged(results)
    assert any(isinstance(r, StageError) for r in results)  # this random judge writes no digit


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(num_candidates=3), "set temperature > 0"),
        (dict(num_candidates=1, select="longest", temperature=1.0), "num_candidates is 1"),
        (dict(num_candidates=2, select="judge", temperature=1.0), "needs a `judge:` block"),
        (dict(judge=dict(model="m")), "select: judge"),
        (dict(num_candidates=2, temperature=1.0, select="judge", judge=dict(model="m", base_url="ftp://x")), "http"),
    ],
)
def test_bad_combinations_fail_at_config_time(settings, message, tiny_models):
    cls = stage_class("VideoCaptioner", FAMILIES["qwen2_vl"])
    with pytest.raises(ValidationError, match=re.escape(message)):
        cls.Config(model_path=str(tiny_models["qwen2_vl"]), **settings)


def test_clip_score_picks_the_best_cosine_with_the_frames(make_captioner, clips, tiny_clip):
    import numpy as np

    from stages.captioners.select import SELECT_FRAMES
    from stages.engines.clip import ClipEncoder, l2_normalise

    stage = make_captioner(
        "qwen2_vl", **SAMPLED, num_candidates=3, select="clip_score", select_model_path=str(tiny_clip)
    )
    prepared = [stage.prepare(r) for r in _records(clips)]
    assert all(0 < len(p[SELECT_FRAMES]) <= 8 for p in prepared)
    results = stage.process(prepared)

    clip = ClipEncoder(str(tiny_clip)).load()  # the same model, scored here independently
    for rec, result in zip(prepared, results, strict=True):
        selection = result[SELECTION]
        frame = l2_normalise(clip.image_embeddings(rec[SELECT_FRAMES]).mean(axis=0))
        expected = clip.text_embeddings(result[CANDIDATES]) @ frame
        assert selection["method"] == "clip_score"
        assert selection["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
        # the best, up to float noise: the tiny CLIP reads only the first few tokens, so candidates
        # that start alike tie, and a tie scored here in another batch may break the other way
        assert expected[selection["index"]] >= float(np.max(expected)) - 1e-5, (selection, expected)
        assert result["text"] == result[CANDIDATES][selection["index"]]
        assert f"{len(rec[SELECT_FRAMES])} frames" in selection["reason"]
    assert len({tuple(r[SELECTION]["scores"]) for r in results}) == len(results)  # scores depend on the clip


def test_clip_score_reuses_a_clip_embedders_frame_embeddings(make_captioner, clips, tiny_clip):
    """A record that carries CLIPEmbedder's per-frame embeddings of the same model is scored with
    them; the frames are not embedded again (one from another model is ignored)."""
    import numpy as np

    from stages.base import InFlight as in_flight
    from stages.captioners.select import FRAME_EMBEDDINGS
    from stages.engines.clip import ClipEncoder, l2_normalise

    stage = make_captioner(
        "qwen2_vl", **SAMPLED, num_candidates=2, select="clip_score", select_model_path=str(tiny_clip)
    )
    vectors = l2_normalise(np.random.default_rng(0).normal(size=(4, 16)))
    same = record(clips["bikes"], rid="same")
    same[FRAME_EMBEDDINGS] = in_flight({"model_path": str(tiny_clip), "vectors": vectors})
    other = record(clips["bikes"], rid="other")
    other[FRAME_EMBEDDINGS] = in_flight({"model_path": "some/other-clip", "vectors": vectors})
    reused, ignored = stage.process([same, other])
    assert "4 frames embedded by CLIPEmbedder" in reused[SELECTION]["reason"]
    assert "CLIPEmbedder" not in ignored[SELECTION]["reason"]
    clip = ClipEncoder(str(tiny_clip)).load()
    expected = clip.text_embeddings(reused[CANDIDATES]) @ l2_normalise(vectors.mean(axis=0))
    assert reused[SELECTION]["scores"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_clip_score_after_a_real_clip_embedder(make_captioner, clips, tiny_clip):
    """CLIPEmbedder then the captioner, as the runtime chains them (the step's result merged
    into the record): the captioner scores with the embedder's frame embeddings."""
    from stages.embedders.clip import CLIPEmbedder, CLIPEmbedderConfig

    embedder = CLIPEmbedder(CLIPEmbedderConfig(model_path=str(tiny_clip), num_frames=5), "cpu")
    embedder.load()
    source = record(clips["moving_h264"])
    (embedded,) = embedder.process([embedder.prepare(source)])
    embedder.close()
    stage = make_captioner(
        "qwen2_vl", **SAMPLED, num_candidates=2, select="clip_score", select_model_path=str(tiny_clip)
    )
    (result,) = stage.process([{**source, **embedded}])
    assert "5 frames embedded by CLIPEmbedder" in result[SELECTION]["reason"]


def test_aprocess_gives_what_process_gives(make_captioner, clips):
    """The runtime awaits aprocess: candidates run in a worker thread, same seeds, same answers."""
    import asyncio

    stage = make_captioner("qwen2_vl", **SAMPLED, num_candidates=2, select="longest")
    prepared = [stage.prepare(r) for r in _records(clips)]
    batch = list(prepared)
    assert asyncio.run(stage.aprocess(batch)) == stage.process(prepared)
    assert batch == prepared  # the runtime's batch is not rewritten
