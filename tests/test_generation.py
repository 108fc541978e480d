"""Generation: the modality grammar under random logits, per-modality sampling, batched CFG, generate() end to end."""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chameleon_fusion.generation import (
    EarlyFusionLogitsProcessor,
    ImageGuidanceLogitsProcessor,
    ModalityConstrainedLogitsProcessor,
    ModalitySamplingLogitsProcessor,
    SamplingSettings,
    build_guidance_streams,
    generation_config_with,
    keep_top_k_top_p,
)
from chameleon_fusion.vocabulary import Vocabulary
from tests.tiny import (
    BOI,
    BOS,
    CODEBOOK,
    EOI,
    EOS,
    IMAGE,
    IMAGE_OFFSET,
    PAD,
    TEXT_VOCAB,
    tiny_config,
    tiny_model,
)

S = 4  # image_seq_length of the tiny layout
VOCAB = IMAGE_OFFSET + CODEBOOK
IMAGE_IDS = list(range(IMAGE_OFFSET, VOCAB))
NEVER_IN_TEXT = {BOI, EOI, IMAGE, BOS, PAD, *IMAGE_IDS}
VOCABULARY = Vocabulary.from_config(tiny_config())
# the same ids with an explicit, reversed code -> id map (as converted checkpoints have): the non-contiguous path
SCATTERED = Vocabulary.from_config(tiny_config(image_token_offset=None, image_token_ids=IMAGE_IDS[::-1]))
MODES = ("text", "image", "interleaved")
FAST = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))



# --- an independent, row-by-row statement of the grammar ----------------------------------------------------


def open_image_at_end(prompt):
    """(inside an image, image ids drawn in it) after reading the whole prompt."""
    inside, drawn = False, 0
    for token in prompt:
        if token == BOI:
            inside, drawn = True, 0
        elif token == EOI:
            inside = False
        elif inside and token in IMAGE_IDS:
            drawn += 1
    return inside, drawn


def grammar_violations(prompt, generated, mode, prompt_length, max_length=None, max_images=None):
    """[(step, token)] for every generated token the grammar forbids; reading stops at eos."""
    inside, drawn = open_image_at_end(prompt)
    opened, image_done, bad = 0, False, []
    for step, token in enumerate(generated):
        length = prompt_length + step
        if inside:
            ok = token in IMAGE_IDS if drawn < S else token == EOI
            drawn += 1
            if drawn > S:
                inside, image_done = False, True
        elif mode == "text":
            ok = token not in NEVER_IN_TEXT
        elif mode == "image":
            ok = token == (EOS if image_done else BOI)
            inside, drawn = token == BOI, 0
        elif token == BOI:
            ok = (max_length is None or length + S + 2 <= max_length) and (max_images is None or opened < max_images)
            inside, drawn, opened = True, 0, opened + 1
        else:
            ok = token not in NEVER_IN_TEXT
        if not ok:
            bad.append((step, token))
        if token == EOS and not inside:
            break
    return bad


# --- prompts: text, whole images, and maybe an image left open at the end ------------------------------------

text_runs = st.lists(st.integers(0, TEXT_VOCAB - 1), min_size=1, max_size=4)
whole_images = st.lists(st.sampled_from(IMAGE_IDS), min_size=S, max_size=S).map(lambda codes: [BOI, *codes, EOI])
open_images = st.integers(0, S).flatmap(
    lambda k: st.lists(st.sampled_from(IMAGE_IDS), min_size=k, max_size=k).map(lambda codes: [BOI, *codes])
)


@st.composite
def prompts(draw):
    pieces = draw(st.lists(st.one_of(text_runs, whole_images), max_size=3))
    ids = [BOS] + [token for piece in pieces for token in piece]
    return ids + (draw(open_images) if draw(st.booleans()) else [])


def left_pad(rows):
    length = max(len(row) for row in rows)
    ids = torch.tensor([[PAD] * (length - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


# --- a driver: random logits, then greedy / sampling / a vectorized beam search ------------------------------


def adversarial_bias(draw):
    """Extra logit mass on the ids a grammar bug would emit: random logits that want to break the rules."""
    bias = torch.zeros(VOCAB)
    for ids in ([BOI], [EOI], [EOS], [BOS], [PAD], [IMAGE], IMAGE_IDS):
        bias[ids] = draw(st.sampled_from([0.0, 4.0, 12.0]))
    return bias


def drive(processors, ids, steps, selection, bias, num_beams=1):
    """Generate `steps` tokens from random logits; returns the ids and the count of tokens drawn by live rows."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    beam_scores = torch.zeros(ids.shape[0])
    beam_scores.view(-1, num_beams)[:, 1:] = -1e9
    drawn = 0
    for _ in range(steps):
        scores = (torch.randn(ids.shape[0], VOCAB) * 3 + bias).log_softmax(-1)
        scores = processors(ids, scores)
        assert torch.isfinite(scores).any(-1).all(), "a row was left with no allowed id"
        drawn += int((~finished).sum())
        if selection == "beam":
            ids, beam_scores, finished = beam_step(ids, scores, beam_scores, finished, num_beams)
            continue
        if selection == "greedy":
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
        token = torch.where(finished, PAD, token)
        finished |= token == EOS
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids, drawn


def beam_step(ids, scores, beam_scores, finished, num_beams):
    """Keep the num_beams best (beam, token) continuations of every prompt: rows move between beams."""
    scores = scores.masked_fill(finished[:, None], float("-inf"))
    scores[finished, PAD] = 0.0
    total = (beam_scores[:, None] + scores).view(-1, num_beams * VOCAB)
    best, index = total.topk(num_beams, dim=-1)
    source = (torch.arange(total.shape[0])[:, None] * num_beams + index // VOCAB).flatten()
    token = (index % VOCAB).flatten()
    return (
        torch.cat([ids[source], token[:, None]], dim=1),
        best.flatten(),
        finished[source] | (token == EOS),
    )


@st.composite
def scenarios(draw):
    mode = draw(st.sampled_from(MODES))
    selection = draw(st.sampled_from(["greedy", "sample", "beam"]))
    rows = draw(st.lists(prompts(), min_size=2, max_size=6))
    num_beams = draw(st.integers(2, 3)) if selection == "beam" else 1
    steps = draw(st.integers(S + 2, 3 * S + 8))
    slack = draw(st.integers(-2, 2 * S))  # max_length around the point where images stop fitting
    text = None if selection == "beam" or draw(st.booleans()) else SamplingSettings(
        draw(st.sampled_from([0.0, 0.7, 1.5])), draw(st.sampled_from([0, 1, 5])), draw(st.sampled_from([1.0, 0.5]))
    )
    return dict(
        mode=mode, selection=selection, rows=rows, num_beams=num_beams, steps=steps, slack=slack, text=text,
        max_images=draw(st.one_of(st.none(), st.integers(0, 2))), bias=adversarial_bias(draw),
        use_sampler=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        vocabulary=draw(st.sampled_from([VOCABULARY, SCATTERED])),
    )


def run_scenario(case):
    torch.manual_seed(case["seed"])
    rows = [row for row in case["rows"] for _ in range(case["num_beams"])]
    ids, _ = left_pad(rows)
    prompt_length = ids.shape[1]
    max_length = prompt_length + S + 2 + case["slack"]
    if case["mode"] == "image":
        max_length = prompt_length + case["steps"]  # image mode: the caller checks that an image fits
    vocabulary = case["vocabulary"]
    processors = [ModalityConstrainedLogitsProcessor(
        vocabulary, case["mode"], max_length=max_length, max_images=case["max_images"], prompt_length=prompt_length
    )]
    if case["use_sampler"]:
        processors.append(ModalitySamplingLogitsProcessor(vocabulary, SamplingSettings(1.0, 8, 0.9), case["text"]))
    out, drawn = drive(LogitsProcessorList(processors), ids, case["steps"], case["selection"], case["bias"],
                       case["num_beams"])
    for row, prompt in zip(out.tolist(), rows):
        bad = grammar_violations(prompt, row[prompt_length:], case["mode"], prompt_length, max_length,
                                 case["max_images"])
        assert not bad, f"{case['mode']}/{case['selection']}: prompt {prompt} generated {row[prompt_length:]}: {bad}"
    return drawn


def test_grammar_holds_under_random_logits_greedy_sampling_and_beam_search():
    drawn = []

    @settings(max_examples=400, **FAST)
    @given(scenarios())
    def check(case):
        drawn.append(run_scenario(case))

    check()
    assert sum(drawn) >= 10_000, f"only {sum(drawn)} generated steps were checked"


def test_grammar_holds_for_guided_stream_groups_and_groups_stay_in_step():
    drawn = []

    @settings(max_examples=60, **FAST)
    @given(st.lists(prompts(), min_size=1, max_size=3), st.sampled_from(["image", "interleaved"]),
           st.booleans(), st.integers(0, 2**16), st.data())
    def check(rows, mode, three_way, seed, data):
        torch.manual_seed(seed)
        ids, mask = left_pad(rows)
        ids, _, streams = build_guidance_streams(ids, mask, VOCABULARY, [BOS], image_only=three_way)
        groups, prompt_length = streams.num_groups, ids.shape[1]
        sampled_text = data.draw(st.booleans())
        processors = LogitsProcessorList([
            ImageGuidanceLogitsProcessor(VOCABULARY, 3.0, 1.5 if three_way else None),
            ModalityConstrainedLogitsProcessor(VOCABULARY, mode, max_length=prompt_length + 3 * S,
                                               prompt_length=prompt_length, num_stream_groups=groups),
            ModalitySamplingLogitsProcessor(VOCABULARY, SamplingSettings(1.0),
                                            SamplingSettings(0.8) if sampled_text else None, groups),
        ])
        out, count = drive(processors, ids, 2 * S + 4, "sample" if sampled_text else "greedy",
                           adversarial_bias(data.draw))
        generated = out[:, prompt_length:].view(groups, len(rows), -1)
        assert (generated == generated[:1]).all(), "the stream rows of a prompt took different tokens"
        for prompt, row in zip(rows, generated[0].tolist()):
            assert not grammar_violations(prompt, row, mode, prompt_length, prompt_length + 3 * S)
        drawn.append(count)

    check()
    assert sum(drawn) >= 1_000


class CheckedSchedule(LogitsProcessor):
    """Runs an EarlyFusionLogitsProcessor with states_from_prompt, checking its schedule against derived states."""

    def __init__(self, processor):
        self.processor, self.steps = processor, 0

    def __call__(self, input_ids, scores):
        states, shared = self.processor.schedule.at(input_ids)
        derived = self.processor.grammar.row_states(input_ids)
        assert torch.equal(states, derived), f"step {self.steps}: schedule {states.tolist()} != {derived.tolist()}"
        assert shared == (int(derived[0]) if bool((derived == derived[0]).all()) else None)
        self.steps += 1
        return self.processor(input_ids, scores)


@given(scenarios().filter(lambda case: case["mode"] != "interleaved"))
@settings(max_examples=60, **FAST)
def test_states_read_from_the_prompt_match_states_derived_at_every_step(case):
    torch.manual_seed(case["seed"])
    rows = [row for row in case["rows"] for _ in range(case["num_beams"])]
    ids, _ = left_pad(rows)
    prompt_length, vocabulary = ids.shape[1], case["vocabulary"]
    grammar = ModalityConstrainedLogitsProcessor(vocabulary, case["mode"], prompt_length=prompt_length)
    sampling = ModalitySamplingLogitsProcessor(vocabulary, SamplingSettings(1.0, 8, 0.9), case["text"])
    checked = CheckedSchedule(EarlyFusionLogitsProcessor(grammar, sampling, states_from_prompt=True))
    out, _ = drive(checked, ids, case["steps"], case["selection"], case["bias"], case["num_beams"])
    assert checked.steps == case["steps"]
    for row, prompt in zip(out.tolist(), rows):
        assert not grammar_violations(prompt, row[prompt_length:], case["mode"], prompt_length)


@pytest.mark.parametrize("vocabulary", [VOCABULARY, SCATTERED], ids=["contiguous", "scattered"])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("mode,rows,sampled_text", [
    ("image", [[BOS, 5, BOI, *IMAGE_IDS[:1]], [BOS, BOI, *IMAGE_IDS[1:3]]], True),  # every row draws an image id
    ("text", [[BOS, 5, 6], [BOS, 7]], False),  # no row does
    ("image", [[BOS, 5], [BOS, 6]], True),  # every row is forced to <boi>
])
def test_a_step_shared_by_every_row_gives_the_scores_of_the_general_step(vocabulary, groups, mode, rows, sampled_text):
    ids, _ = left_pad(rows * groups)
    scores = torch.randn(ids.shape[0], VOCAB)

    def processor(states_from_prompt):
        guidance = ImageGuidanceLogitsProcessor(vocabulary, 2.0, 1.5 if groups == 3 else None) if groups > 1 else None
        grammar = ModalityConstrainedLogitsProcessor(vocabulary, mode, prompt_length=2, num_stream_groups=groups)
        sampling = ModalitySamplingLogitsProcessor(vocabulary, SamplingSettings(0.9, 5),
                                                   SamplingSettings(1.2) if sampled_text else None, groups)
        return EarlyFusionLogitsProcessor(grammar, sampling, guidance, states_from_prompt)

    outputs = []
    for states_from_prompt in (False, True):
        torch.manual_seed(0)  # an image draw comes first in both; the text draw is skipped where every row is forced
        outputs.append(processor(states_from_prompt)(ids, scores.clone()))
    torch.testing.assert_close(outputs[1], outputs[0])


def test_state_schedule_is_refused_for_interleaved_generation():
    grammar = ModalityConstrainedLogitsProcessor(VOCABULARY, "interleaved")
    with pytest.raises(ValueError, match="interleaved"):
        EarlyFusionLogitsProcessor(grammar, ModalitySamplingLogitsProcessor(VOCABULARY), states_from_prompt=True)


@given(st.lists(prompts(), min_size=1, max_size=3), st.sampled_from(MODES), st.sampled_from([1, 2, 3]),
       st.booleans(), st.integers(0, 2**16))
@settings(max_examples=40, **FAST)
def test_the_combined_processor_equals_the_three_in_sequence(rows, mode, groups, sampled_text, seed):
    ids, _ = left_pad(rows * groups)
    scores = torch.randn(ids.shape[0], VOCAB, generator=torch.Generator().manual_seed(seed))
    def parts():
        guidance = ImageGuidanceLogitsProcessor(VOCABULARY, 2.0, 1.5 if groups == 3 else None) if groups > 1 else None
        grammar = ModalityConstrainedLogitsProcessor(VOCABULARY, mode, max_length=ids.shape[1] + 7,
                                                     max_images=1, prompt_length=2, num_stream_groups=groups)
        sampling = ModalitySamplingLogitsProcessor(VOCABULARY, SamplingSettings(0.9, 5),
                                                   SamplingSettings(1.2) if sampled_text else None, groups)
        return grammar, sampling, guidance
    grammar, sampling, guidance = parts()
    torch.manual_seed(seed)
    combined = EarlyFusionLogitsProcessor(grammar, sampling, guidance)(ids, scores.clone())
    grammar, sampling, guidance = parts()
    torch.manual_seed(seed)
    in_sequence = LogitsProcessorList([p for p in (guidance, grammar, sampling) if p is not None])(ids, scores.clone())
    torch.testing.assert_close(combined, in_sequence)


def test_states_follow_rows_when_beam_search_reorders_them():
    rows = [[BOS, 5, BOI, *IMAGE_IDS[:2]], [BOS, 7, 8], [BOS, BOI, *IMAGE_IDS[:S]], [BOS, BOI, *IMAGE_IDS[:S], EOI]]
    ids, _ = left_pad(rows)
    scores = torch.randn(len(rows), VOCAB)
    processor = ModalityConstrainedLogitsProcessor(VOCABULARY, "interleaved", max_length=100, prompt_length=2)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(processor(ids[order], scores[order]), processor(ids, scores)[order])
    allowed = processor(ids, scores).isfinite()
    assert allowed[0, IMAGE_IDS].all() and allowed[0].sum() == CODEBOOK
    assert allowed[2].nonzero().flatten().tolist() == [EOI]
    assert allowed[1, BOI] and allowed[3, BOI] and not allowed[1, IMAGE_IDS].any()


def test_text_mode_allows_exactly_text_and_eos():
    processor = ModalityConstrainedLogitsProcessor(VOCABULARY, "text")
    allowed = processor(torch.tensor([[BOS, 3]]), torch.zeros(1, VOCAB)).isfinite()[0]
    assert allowed.nonzero().flatten().tolist() == [*range(TEXT_VOCAB), EOS]


def test_forced_ids_win_over_earlier_bans():
    processor = ModalityConstrainedLogitsProcessor(VOCABULARY, "image", prompt_length=2)
    scores = torch.zeros(1, VOCAB)
    scores[0, BOI] = float("-inf")  # e.g. bad_words_ids
    out = processor(torch.tensor([[BOS, 3]]), scores)
    assert out[0, BOI] == 0 and out.isfinite().sum() == 1


def test_interleaved_opens_an_image_only_while_it_fits_and_below_max_images():
    prompt = torch.tensor([[BOS, BOI, *IMAGE_IDS[:S], EOI, 7]])  # an image in the prompt does not count
    length = prompt.shape[1]
    def boi_allowed(max_length, max_images=None, ids=prompt):
        processor = ModalityConstrainedLogitsProcessor(
            VOCABULARY, "interleaved", max_length=max_length, max_images=max_images, prompt_length=length
        )
        return bool(processor(ids, torch.zeros(1, VOCAB))[0, BOI].isfinite())

    assert boi_allowed(length + S + 2) and not boi_allowed(length + S + 1)
    assert boi_allowed(100, max_images=1) and not boi_allowed(100, max_images=0)
    one_generated = torch.cat([prompt, torch.tensor([[BOI, *IMAGE_IDS[:S], EOI, 9]])], dim=1)
    assert boi_allowed(100, 2, one_generated) and not boi_allowed(100, 1, one_generated)


def test_processor_arguments_are_checked():
    with pytest.raises(ValueError, match="generation_mode"):
        ModalityConstrainedLogitsProcessor(VOCABULARY, "video")
    with pytest.raises(ValueError, match="max_images"):
        ModalityConstrainedLogitsProcessor(VOCABULARY, "interleaved", max_images=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=-1.0)


# --- per-modality sampling --------------------------------------------------------------------------------


def test_image_tokens_are_sampled_while_text_rows_are_left_to_greedy_search():
    torch.manual_seed(0)
    ids = torch.tensor([[BOS, BOI, IMAGE_IDS[0]], [BOS, 4, 5]])
    scores = torch.randn(2, VOCAB)
    sampler = ModalitySamplingLogitsProcessor(VOCABULARY, SamplingSettings(temperature=1.0))
    picks = set()
    for _ in range(50):
        out = sampler(ids, scores.clone())
        assert out[0].isfinite().sum() == 1
        chosen = int(out[0].argmax())
        assert out[0, chosen] == scores[0, chosen]  # the drawn id keeps its score
        picks.add(chosen)
        torch.testing.assert_close(out[1], scores[1])
    assert len(picks) > 5  # sampled, not argmax


@pytest.mark.parametrize("vocabulary", [VOCABULARY, SCATTERED], ids=["contiguous", "scattered"])
def test_greedy_top_k_and_top_p_settings_pick_the_argmax(vocabulary):
    ids = torch.tensor([[BOS, BOI], [BOS, 3]])
    scores = torch.randn(2, VOCAB)
    best_image_id = IMAGE_IDS[int(scores[0, IMAGE_IDS].argmax())]  # image ids are drawn among image columns
    for image in (SamplingSettings(0.0), SamplingSettings(1.0, top_k=1), SamplingSettings(1.0, top_p=1e-6)):
        sampler = ModalitySamplingLogitsProcessor(vocabulary, image, text=SamplingSettings(0.0))
        out = sampler(ids, scores)
        assert int(out[0].argmax()) == best_image_id and int(out[1].argmax()) == int(scores[1].argmax())
        assert out.isfinite().sum() == 2


@given(st.integers(1, 40), st.floats(0.05, 1.0), st.integers(0, 2**16))
@settings(max_examples=40, **FAST)
def test_top_k_top_p_filter_matches_transformers_warpers(top_k, top_p, seed):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3
    ours = keep_top_k_top_p(logits, torch.full((3,), top_k), torch.full((3,), top_p)).isfinite()
    theirs = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits.clone())).isfinite()
    assert torch.equal(ours, theirs)


# --- classifier-free guidance -----------------------------------------------------------------------------


def test_guidance_scores_follow_the_formula_only_inside_images():
    ids = torch.tensor([[BOS, BOI, IMAGE_IDS[0]], [BOS, 5, 6]] * 3)  # 3 groups x 2 prompts
    prompt, image_only, unconditional = torch.randn(3, 2, VOCAB).unbind(0)
    unconditional[:, IMAGE_IDS[7]] = float("-inf")
    two = ImageGuidanceLogitsProcessor(VOCABULARY, 3.0)(ids[:4], torch.cat([prompt, unconditional]))
    expected = unconditional[0, IMAGE_IDS] + 3.0 * (prompt[0, IMAGE_IDS] - unconditional[0, IMAGE_IDS])
    expected[7] = float("-inf")
    for row in (0, 2):  # the unconditional row gets the same scores
        torch.testing.assert_close(two[row, IMAGE_IDS], expected)
        torch.testing.assert_close(two[row, :IMAGE_OFFSET], prompt[0, :IMAGE_OFFSET])  # banned there by the grammar
    torch.testing.assert_close(two[1], prompt[1])  # text row: the prompt stream's scores
    torch.testing.assert_close(two[3], prompt[1])
    three = ImageGuidanceLogitsProcessor(VOCABULARY, 3.0, 1.5)(ids, torch.cat([prompt, image_only, unconditional]))
    p, i, u = (stream[0, IMAGE_IDS] for stream in (prompt, image_only, unconditional))
    expected = u + 1.5 * (i - u) + 3.0 * (p - i)
    expected[7] = float("-inf")
    for row in (0, 2, 4):
        torch.testing.assert_close(three[row, IMAGE_IDS], expected)


def steered_model(seed=0):
    """The tiny model with a loud random LM head: every context prefers different ids, strongly."""
    model = tiny_model(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    return model


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def reference_guided(model, streams, mode, scale, steps, image_scale=None, boi_bias=0.0, max_images=None):
    """Guided greedy decoding with one separate forward per stream and step, written out plainly.

    streams: [prompt, (image-only,) unconditional]; the unconditional stream sees its ids plus the current image
    segment only, the image-only stream the generated image ids, the prompt stream everything.
    """
    prompt, generated = streams[0], []
    for _ in range(steps):
        bad_now = lambda token: grammar_violations(prompt, generated + [token], mode, 0, None, max_images)  # noqa: E731
        inside, drawn = open_image_at_end(prompt + generated)
        if inside and drawn < S:
            start = max(i for i, t in enumerate(prompt + generated) if t == BOI) - len(prompt)
            contexts = [prompt + generated]
            if image_scale is not None:
                contexts.append(streams[1] + [t for t in generated if t in IMAGE_IDS or t in (BOI, EOI)])
            contexts.append(streams[-1] + (generated[start:] if start >= 0 else generated))
            logits = [last_logits(model, c) for c in contexts]
            u = logits[-1]
            if image_scale is None:
                guided = u + scale * (logits[0] - u)
            else:
                guided = u + image_scale * (logits[1] - u) + scale * (logits[0] - logits[1])
            token = IMAGE_IDS[int(guided[IMAGE_IDS].argmax())]
        else:
            logits = last_logits(model, prompt + generated)
            logits[BOI] += boi_bias
            allowed = [t for t in range(VOCAB) if not bad_now(t)]
            token = allowed[int(logits[allowed].argmax())]
        generated.append(token)
        if token == EOS:
            break
    return generated


def test_batched_guidance_equals_separate_streams_in_image_mode():
    model = steered_model()
    rows = [[BOS, 11, 12, 13], [BOS, 40, BOI, IMAGE_IDS[3]]]  # the second prompt ends inside an image
    ids, mask = left_pad(rows)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", text_guidance_scale=3.0,
                         image_temperature=0.0)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", image_temperature=0.0)
    for row, prompt in zip(out.tolist(), rows):
        generated = [t for t in row[ids.shape[1]:] if t != PAD]
        reference = reference_guided(model, [prompt, [BOS] + prompt[prompt.index(BOI):] if BOI in prompt else [BOS]],
                                     "image", 3.0, S + 3)
        assert generated == reference
    assert not torch.equal(out, plain), "guidance changed nothing: the test could not tell"


def test_batched_guidance_equals_separate_streams_across_two_interleaved_images():
    model = steered_model(1)
    rows = [[BOS, 21, 22], [BOS, 30]]
    ids, mask = left_pad(rows)
    new_tokens = 2 * (S + 2) + 3
    kwargs = dict(generation_mode="interleaved", text_guidance_scale=2.5, image_temperature=0.0, max_images=2,
                  max_new_tokens=new_tokens, sequence_bias={(BOI,): 500.0})
    outputs = [model.generate(input_ids=ids, attention_mask=mask, **kwargs, **cache) for cache in
               ({}, {"use_cache": False}, {"cache_implementation": "static"})]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    for row, prompt in zip(outputs[0].tolist(), rows):
        generated = row[ids.shape[1]:]
        assert generated.count(BOI) == 2
        reference = reference_guided(model, [prompt, [BOS]], "interleaved", 2.5, new_tokens, boi_bias=500.0,
                                     max_images=2)
        assert generated[: len(reference)] == reference


def test_batched_three_way_guidance_equals_separate_streams():
    model = steered_model(2)
    image = [BOI, *IMAGE_IDS[5 : 5 + S], EOI]
    rows = [[BOS, 9, *image, 14, 15], [BOS, *image, 3]]
    ids, mask = left_pad(rows)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", text_guidance_scale=2.0,
                         image_guidance_scale=1.5, image_temperature=0.0)
    for row, prompt in zip(out.tolist(), rows):
        image_only = [t for t in prompt if t in IMAGE_IDS or t in (BOS, BOI, EOI)]
        reference = reference_guided(model, [prompt, image_only, [BOS]], "image", 2.0, S + 3, image_scale=1.5)
        assert [t for t in row[ids.shape[1]:] if t != PAD] == reference


def test_guidance_with_sampling_returns_prompt_rows_that_keep_the_grammar():
    model = steered_model()
    rows = [[BOS, 3], [BOS, 4, 5, 6]]
    ids, mask = left_pad(rows)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_mode="interleaved", do_sample=True,
                         text_guidance_scale=4.0, max_new_tokens=20, sequence_bias={(BOI,): 30.0},
                         num_return_sequences=2)
    assert out.shape[0] == 4
    for row, prompt in zip(out.tolist(), [rows[0], rows[0], rows[1], rows[1]]):
        assert row[: ids.shape[1]] == ids[rows.index(prompt)].tolist()
        assert BOI in row and not grammar_violations(prompt, row[ids.shape[1]:], "interleaved", ids.shape[1],
                                                     ids.shape[1] + 20)


# --- generate() -------------------------------------------------------------------------------------------


@st.composite
def generate_cases(draw):
    return dict(
        rows=draw(st.lists(prompts(), min_size=1, max_size=3)),
        mode=draw(st.sampled_from(MODES)),
        search=draw(st.sampled_from([{}, {"do_sample": True}, {"num_beams": 2}, {"text_temperature": 0.9}])),
        cache=draw(st.sampled_from([{}, {"use_cache": False}, {"cache_implementation": "static"}])),
        bias=draw(st.sampled_from([{}, {(BOI,): 8.0, (EOI,): 8.0, (BOS,): 8.0}, {(EOS,): 8.0, (PAD,): 8.0}])),
        max_images=draw(st.one_of(st.none(), st.integers(0, 2))),
        seed=draw(st.integers(0, 2**16)),
    )


def test_generate_keeps_the_grammar_with_every_search_and_cache():
    model, drawn = steered_model(), []

    @settings(max_examples=24, **FAST)
    @given(generate_cases())
    def check(case):
        torch.manual_seed(case["seed"])
        ids, mask = left_pad(case["rows"])
        new_tokens = 2 * S + 5
        out = model.generate(input_ids=ids, attention_mask=mask, generation_mode=case["mode"],
                             max_new_tokens=new_tokens, max_images=case["max_images"],
                             sequence_bias=case["bias"] or None, **case["search"], **case["cache"])
        for prompt, row in zip(case["rows"], out.tolist()):
            generated = row[ids.shape[1]:]
            assert not grammar_violations(prompt, generated, case["mode"], ids.shape[1], ids.shape[1] + new_tokens,
                                          case["max_images"]), (case, generated)
            drawn.append(len(generated))

    check()
    assert sum(drawn) >= 300


def test_image_tokens_are_sampled_by_default_even_with_greedy_text():
    model = tiny_model()
    ids = torch.tensor([[BOS, 5, 6]])
    torch.manual_seed(0)
    out = model.generate(ids, generation_mode="image", num_return_sequences=3)
    assert out.shape == (3, 3 + S + 3) and len({tuple(row) for row in out[:, 3:].tolist()}) == 3
    greedy = {tuple(model.generate(ids, generation_mode="image", image_temperature=0)[0].tolist()) for _ in range(2)}
    assert len(greedy) == 1


def test_settings_saved_in_generation_config_json_apply_and_kwargs_override_them(tmp_path):
    from chameleon_fusion import ChameleonFusionForConditionalGeneration

    model = tiny_model()
    model.generation_config = generation_config_with(model.generation_config, image_temperature=0.0, max_images=0)
    model.save_pretrained(tmp_path)
    model = ChameleonFusionForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[BOS, 5, 6]])
    first, second = (model.generate(ids, generation_mode="image") for _ in range(2))
    assert torch.equal(first, second)  # greedy images, from the json
    interleaved = model.generate(ids, generation_mode="interleaved", max_new_tokens=15,
                                 sequence_bias={(BOI,): 100.0})
    assert BOI not in interleaved[0].tolist()  # max_images=0 from the json
    overridden = model.generate(ids, generation_mode="interleaved", max_new_tokens=15, max_images=1,
                                sequence_bias={(BOI,): 100.0})
    assert overridden[0].tolist().count(BOI) == 1
    with pytest.raises(ValueError, match="image_temprature"):
        generation_config_with(model.generation_config, image_temprature=0.5)


def test_image_mode_draws_one_image_then_eos_by_default():
    out = tiny_model().generate(torch.tensor([[BOS, 5]]), generation_mode="image")
    generated = out[0, 2:].tolist()
    assert generated[0] == BOI and generated[S + 1 :] == [EOI, EOS]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"generation_mode": "audio"}, "generation_mode"),
        ({"generation_mode": "interleaved", "max_images": -1}, "max_images"),
        ({"generation_mode": "image", "max_new_tokens": S + 1}, "max_new_tokens"),
        ({"generation_mode": "text", "text_guidance_scale": 3.0}, "text_guidance_scale"),
        ({"generation_mode": "image", "image_guidance_scale": 1.5}, "image_guidance_scale"),
        ({"generation_mode": "image", "text_guidance_scale": 3.0, "unconditional_ids": [BOS, BOI]},
         "unconditional_ids"),
        ({"generation_mode": "image", "text_guidance_scale": 3.0, "unconditional_ids": []}, "unconditional_ids"),
        ({"generation_mode": "image", "text_guidance_scale": 3.0, "num_beams": 2}, "num_beams"),
        ({"generation_mode": "text", "text_temperature": 0.5, "num_beams": 2}, "text_temperature"),
    ],
)
def test_bad_generate_arguments_raise_a_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny_model().generate(torch.tensor([[BOS, 5]]), **kwargs)


# --- end to end through the processor ---------------------------------------------------------------------


class SteerRows(LogitsProcessor):
    """Test steering: row 0 opens an image at its third new token; row 1 never does; nobody stops early."""

    def __init__(self, prompt_length, boi, eos):
        self.prompt_length, self.boi, self.eos = prompt_length, boi, eos

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos] = float("-inf")
        scores[1, self.boi] = float("-inf")
        if input_ids.shape[1] - self.prompt_length == 2:
            scores[0, self.boi] += 1e4
        return scores


def processor_and_model():
    from tests.tiny import tiny_processor

    processor = tiny_processor()
    layout = {k: v for k, v in processor.vocabulary.layout().items() if v is not None}
    torch.manual_seed(0)
    from chameleon_fusion import ChameleonFusionForConditionalGeneration

    model = ChameleonFusionForConditionalGeneration(tiny_config(**layout)).eval()
    return processor, model


def test_image_mode_yields_images_that_decode_through_the_processor():
    from PIL import Image

    processor, model = processor_and_model()
    inputs = processor(text=["a photo of a sneaker", "a bag"], return_tensors="pt", padding=True,
                       padding_side="left")
    for guidance in ({}, {"text_guidance_scale": 3.0}):
        out = model.generate(**inputs, generation_mode="image", **guidance)
        images = processor.post_process_multimodal_output(out, generation_mode="image")
        assert len(images) == 2 and all(isinstance(image, Image.Image) for image in images)
        assert images[0].size == (16, 16)


def test_interleaved_row_gets_text_image_text_while_its_neighbour_stays_text():
    from PIL import Image

    processor, model = processor_and_model()
    vocabulary = processor.vocabulary
    inputs = processor(text=["here is a bag", "the quick brown fox"], return_tensors="pt", padding=True,
                       padding_side="left")
    steer = SteerRows(inputs["input_ids"].shape[1], vocabulary.boi_token_id, vocabulary.eos_token_ids[0])
    out = model.generate(**inputs, generation_mode="interleaved", max_new_tokens=vocabulary.image_seq_length + 8,
                         max_images=1, logits_processor=[steer])
    first, second = processor.post_process_multimodal_output(out, generation_mode="interleaved")
    generated = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert generated.index(vocabulary.boi_token_id) == 2 and vocabulary.eoi_token_id in generated
    kinds = [type(part) for part in first]
    assert kinds[-3:] == [str, Image.Image, str] and kinds.count(Image.Image) == 1
    assert all(isinstance(part, str) for part in second)


def test_document_page_shows_text_and_images_in_order(tmp_path):
    from PIL import Image

    from chameleon_fusion.document_html import write_document_html

    picture = Image.new("RGB", (8, 8), (255, 0, 0))
    page = write_document_html([["a <b>red</b> square:", picture, "done"], ["only text"]], tmp_path, title="T & co")
    html = page.read_text()
    assert page == tmp_path / "index.html"
    assert "a &lt;b&gt;red&lt;/b&gt; square:" in html and "T &amp; co" in html
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (8, 8)
    assert html.index("square") < html.index(pngs[0].name) < html.index("done") < html.index("only text")


def test_generate_command_writes_pngs_and_the_interleaved_page(tmp_path):
    from chameleon_fusion.cli import main

    processor, model = processor_and_model()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["generate", "--model", str(tmp_path / "model"), "--prompt", "a photo of", "--seed", "0"]
    assert main([*common, "--mode", "image", "--out", str(tmp_path / "image")]) == 0
    assert len(list((tmp_path / "image").glob("*.png"))) == 1
    assert main([*common, "--mode", "interleaved", "--max-new-tokens", "30", "--out", str(tmp_path / "doc")]) == 0
    assert (tmp_path / "doc" / "index.html").exists()
    assert main([*common, "--mode", "text", "--max-new-tokens", "5", "--out", str(tmp_path / "text")]) == 0
    assert (tmp_path / "text" / "output.txt").read_text()


def test_stop_check_deferral_covers_cuda_only_and_ends_with_its_block():
    from transformers.generation.utils import DeferredStopCheck

    from chameleon_fusion.generation import stop_checks_deferred_on

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cache = DynamicCache()
    assert not DeferredStopCheck.is_supported(cuda, cache, False, False)
    with stop_checks_deferred_on(cpu):
        assert not DeferredStopCheck.is_supported(cuda, cache, False, False)
    with stop_checks_deferred_on(cuda):
        assert DeferredStopCheck.is_supported(cuda, None, False, False)
        assert DeferredStopCheck.is_supported(cuda, cache, True, False)  # a dynamic cache can undo the extra step
        assert not DeferredStopCheck.is_supported(cuda, cache, False, True)  # assistant models: never
        assert not DeferredStopCheck.is_supported(cpu, cache, False, False)
    assert not DeferredStopCheck.is_supported(cuda, cache, False, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["text", "image"])
def test_deferred_stop_checks_give_the_tokens_of_immediate_ones_on_cuda(mode):
    from transformers.generation.utils import DeferredStopCheck

    from chameleon_fusion import generation

    model, ids = tiny_model().cuda(), torch.tensor([[BOS, 5, 6]], device="cuda")
    greedy_text = model.generate(ids, generation_mode="text", max_new_tokens=12)[0, 3:].tolist()
    eos = greedy_text[5]  # greedy search reaches it mid-way, so the deferred loop runs one step past the end
    outputs, deferred_in_run = [], []
    original_init = DeferredStopCheck.__init__

    def counting_init(self, *args):
        deferred_in_run.append(len(outputs))
        original_init(self, *args)

    for defer in (False, True):
        torch.manual_seed(0)
        switch = generation.stop_checks_deferred_on if defer else lambda device: contextlib.nullcontext()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(generation, "stop_checks_deferred_on", switch)
            patch.setattr(DeferredStopCheck, "__init__", counting_init)
            outputs.append(model.generate(ids, generation_mode=mode, max_new_tokens=12 if mode == "text" else None,
                                          eos_token_id=eos if mode == "text" else EOS).tolist())
    assert deferred_in_run == [1] and outputs[0] == outputs[1]  # only the second run deferred, same tokens
