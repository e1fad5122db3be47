"""The VQA (BLIP) and detector (OWL-ViT) verifiers on tiny random models saved to disk.

The real weights cannot be downloaded here; tiny models of the same classes, saved with their
processors as safetensors folders, go through the real loading code and the real transformers
forward passes, so an API change in transformers or a wrong token id shows up in CI.
"""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from editkit.constraints import align, parse_prompt
from editkit.testing import tiny_tokenizer
from editkit.verifiers import (
    RELATION_WORDS,
    ConstraintStatus,
    DetectorVerifier,
    VQAVerifier,
    attention_crop,
    descriptions,
    make_verifier,
)

PROMPT = "a red car to the left of a blue bird"
WORDS = ["yes", "no", "is", "there", "a", "the", "red", "car", "blue", "bird", "left", "of", "to", "photo", "?"]
WORDS += ["in", "image"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = SMALL | {"image_size": 32, "patch_size": 8}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def aligned():
    return align(parse_prompt(PROMPT), tiny_tokenizer(WORDS))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipProcessor

    folder = tmp_path_factory.mktemp("blip-vqa")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab)
    image_processor = _image_processor("BlipImageProcessor")
    text = SMALL | {"vocab_size": len(vocab), "encoder_hidden_size": 32, "max_position_embeddings": 64}
    config = BlipConfig(
        text_config=text | {"pad_token_id": 0, "bos_token_id": 2, "sep_token_id": 3, "initializer_range": 0.5},
        vision_config=VISION | {"initializer_range": 0.5},
        projection_dim=32,
    )  # a wide initialisation, so that the questions' answers differ clearly
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(folder, safe_serialization=True)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def owlvit_dir(tmp_path_factory):
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor

    folder = tmp_path_factory.mktemp("owlvit")
    # OWL-ViT masks out queries whose first token id is 0 (padding): real CLIP's start token is
    # 49406, so shift the tiny tokenizer's ids up by one.
    base = tiny_tokenizer(WORDS, model_max_length=16)
    vocab = {"<unused>": 0} | {token: index + 1 for token, index in base.get_vocab().items()}
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=_merges(base),
        model_max_length=16,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        pad_token=base.pad_token,
        unk_token=base.unk_token,
    )
    text = SMALL | {"vocab_size": len(vocab), "max_position_embeddings": 16}
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = OwlViTConfig(
        text_config=text | ids | {"pad_token_id": tokenizer.pad_token_id}, vision_config=VISION, projection_dim=32
    )
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(folder, safe_serialization=True)
    OwlViTProcessor(image_processor=_image_processor("OwlViTImageProcessor"), tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder


def _image_processor(name: str):
    """The PIL backend of a transformers image processor at 32x32 (no torchvision needed)."""
    import transformers

    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    size = {"height": 32, "width": 32}
    return cls(size=size, crop_size=size) if "Owl" in name else cls(size=size)


def _merges(tokenizer) -> list[tuple[str, str]]:
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _image() -> Image.Image:
    image = Image.new("RGB", (48, 40), (255, 255, 255))
    image.paste((220, 20, 20), (4, 12, 20, 28))
    image.paste((20, 20, 220), (28, 12, 44, 28))
    return image


def test_vqa_verifier_scores_are_blips_own_first_answer_token(blip_dir, aligned):
    verifier = make_verifier("vqa", model=str(blip_dir))
    assert isinstance(verifier, VQAVerifier) and verifier.yes_id != verifier.no_id
    statuses = verifier.verify(_image(), aligned, None)
    rows = descriptions(aligned)
    assert [(s.kind, s.description, s.entities) for s in statuses] == [(k, t, e) for k, t, e, _ in rows]
    # the paper's coarse and fine questions (its released question files' wording), then the relation
    questions = ["is there a car in the image?", "is there a bird in the image?"]
    questions += ["is there a red car in the image?", "is there a blue bird in the image?"]
    questions.append(f"is the car {RELATION_WORDS['left']} the bird?")
    assert verifier.questions(aligned) == questions
    for status, question in zip(statuses, questions):
        assert status.score == pytest.approx(_generate_yes(verifier, _image(), question), abs=1e-4)
        assert status.satisfied == (status.score >= verifier.threshold == 0.5)
    scores = sorted(s.score for s in statuses)
    assert scores[-1] - scores[0] > 0.01  # the questions differ, so do the answers


def _generate_yes(verifier, image, question: str) -> float:
    """transformers' own generate: the first decoding step's P(yes) among {yes, no}."""
    inputs = verifier.processor(images=image, text=question, return_tensors="pt")
    out = verifier.model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True)
    return float(torch.softmax(out.scores[0][0, [verifier.yes_id, verifier.no_id]], dim=0)[0])


def test_vqa_verifier_asks_again_on_each_entitys_attention_crop(blip_dir, aligned):
    verifier = make_verifier("vqa", model=str(blip_dir))
    maps = torch.zeros(aligned.last_token, 4, 4)
    car, bird = aligned.entities
    maps[car[0] - 1, 1:3, 0:2] = 1.0  # the car attends to the left half, the bird to the right
    maps[bird[0] - 1, 1:3, 2:4] = 1.0
    crop = attention_crop(_image(), maps[car[0] - 1], margin=0.0)
    assert crop.size == (24, 20)  # 2 x 2 of 4 x 4 cells of a 48 x 40 image
    statuses = verifier.verify(_image(), aligned, maps)
    crops = [attention_crop(_image(), maps[t[0] - 1]) for t in aligned.entities]
    differ = []
    for status, question in zip(statuses, verifier.questions(aligned)):
        views = [_image()] if status.kind == "relation" else [_image(), crops[status.entities[0]]]
        answers = [_generate_yes(verifier, v, question) for v in views]
        assert status.score == pytest.approx(min(answers), abs=1e-4)
        differ.append(max(answers) - min(answers))
    assert max(differ) > 1e-3  # the crops are really asked: their answers differ from the full image's


def test_vqa_verifier_refines_at_least_one_entity_and_ranks_by_da_score(blip_dir):
    verifier = make_verifier("vqa", model=str(blip_dir))
    rows = [("entity", "car", 0.9, (0,)), ("entity", "bird", 0.7, (1,)), ("attribute", "red car", 0.6, (0,))]
    statuses = [ConstraintStatus(k, t, score >= 0.5, score, e, 0.5, "vqa") for k, t, score, e in rows]
    assert verifier.faulty_entities(statuses) == [0]  # nothing failed: the lowest-scoring entity
    statuses[1] = ConstraintStatus("entity", "bird", False, 0.2, (1,), 0.5, "vqa")
    assert verifier.faulty_entities(statuses) == [1]
    assert verifier.rank(statuses) == pytest.approx(((0.9 + 0.2 + 0.6) / 3,))


def test_detector_verifier_boxes_and_relations(owlvit_dir, aligned):
    verifier = make_verifier("detector", model=str(owlvit_dir))
    assert isinstance(verifier, DetectorVerifier)
    queries = [f"a photo of a {t}" for kind, t, _, _ in descriptions(aligned) if kind != "relation"]
    scores, centres = verifier.detect(_image(), queries)
    assert scores.shape == (4,) and centres.shape == (4, 2)
    assert bool(((scores > 0) & (scores < 1)).all())  # real sigmoid scores: no query was masked out
    assert bool(((centres >= 0) & (centres <= 1)).all())

    verifier.threshold = float(scores.min()) - 1e-6  # every entity present: relations decided by boxes
    statuses = verifier.verify(_image(), aligned, None)
    assert all(s.satisfied for s in statuses if s.kind != "relation")
    relation = next(s for s in statuses if s.kind == "relation")
    car_x, bird_x = float(centres[0, 0]), float(centres[1, 0])
    assert relation.score == pytest.approx(bird_x - car_x, abs=1e-6)
    assert relation.satisfied == (car_x < bird_x)

    verifier.threshold = float(scores.max()) + 1e-6  # nothing found: every constraint fails
    assert not any(s.satisfied for s in verifier.verify(_image(), aligned, None))


def test_compose_with_the_vqa_verifier_reports_its_scores_on_the_decoded_image(blip_dir):
    from editkit.testing import tiny_sd15_components
    from pipelines.compose import ComposePipeline

    parts = tiny_sd15_components(seed=0, words=WORDS)
    pipe = ComposePipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    verifier = VQAVerifier(str(blip_dir), threshold=1.01)  # nothing passes: stage 2 always runs
    seen = []
    original = verifier.verify
    verifier.verify = lambda image, aligned, maps: (seen.append((image, maps)), original(image, aligned, maps))[1]
    options = {"height": 64, "width": 64, "num_inference_steps": 3, "max_iter_to_alter": 1}
    out = pipe(PROMPT, verifier=verifier, generator=torch.Generator().manual_seed(0), **options)
    stage1 = pipe(PROMPT, refine=False, generator=torch.Generator().manual_seed(0), **options).images[0]
    image, maps = seen[0]
    assert list(image.getdata()) == list(stage1.getdata())  # the decoded stage-1 image, and its maps
    assert maps is not None and maps.shape[0] == align(out.constraints, pipe.tokenizer).last_token
    expected = original(stage1, align(out.constraints, pipe.tokenizer), maps)
    assert [s.score for s in out.report_before] == pytest.approx([s.score for s in expected], abs=1e-5)
    assert out.refined_noise is not None and out.report_after is not None
    assert (out.chosen == "refined") == (verifier.rank(out.report_after) > verifier.rank(out.report_before))
