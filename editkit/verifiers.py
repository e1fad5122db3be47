"""Verifiers: score each constraint on a generated image and mark the faulty entities.

One interface (:class:`Verifier`), three implementations:

- :class:`AttentionVerifier` (default, no extra weights): each entity's attention map has a
  clear peak, attribute maps overlap their noun's, centroids respect the relations;
- :class:`VQAVerifier`: BLIP VQA via transformers, P("yes") to "is there a red car?" (the
  paper's verifier; the same family as T2I-CompBench's attribute metric, so it flatters it);
- :class:`DetectorVerifier`: OWL-ViT open-vocabulary detection via transformers.

The two model-based verifiers load user-given weights (a Hub id or a local folder) and raise
:class:`~editkit.errors.ModelLoadError` with the fix when the weights are not available.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from editkit.constraints import AlignedConstraints
from editkit.errors import InputError, ModelLoadError
from editkit.refine import entity_maps, relation_gap, soft_iou

__all__ = [
    "VERIFIERS",
    "AttentionVerifier",
    "ConstraintStatus",
    "DetectorVerifier",
    "VQAVerifier",
    "Verifier",
    "attention_crop",
    "make_verifier",
    "verifier_score",
]

logger = logging.getLogger(__name__)

VERIFIERS = ("attention", "shapes", "vqa", "detector")
RELATION_WORDS = {
    "left": "on the left of",
    "right": "on the right of",
    "above": "above",
    "below": "below",
    "near": "next to",
}


@dataclass
class ConstraintStatus:
    """One constraint's verdict: ``kind`` entity/attribute/relation, ``entities`` involved.

    ``satisfied`` is ``score >= threshold`` (``score > threshold`` for attention relations);
    ``verifier`` names who judged it; ``note`` says why a constraint could not be judged.
    """

    kind: str
    description: str
    satisfied: bool
    score: float
    entities: tuple[int, ...]
    threshold: float | None = None
    verifier: str = ""
    note: str = ""


def descriptions(aligned: AlignedConstraints) -> list[tuple[str, str, tuple[int, ...], object]]:
    """(kind, description, entities, detail) of every constraint, in report order.

    ``detail`` is the attribute's token indices for attributes and the relation's name for relations.
    """
    rows: list[tuple[str, str, tuple[int, ...], object]] = [
        ("entity", name, (i,), None) for i, name in enumerate(aligned.names)
    ]
    rows += [("attribute", f"{attr} {aligned.names[e]}", (e,), tokens) for tokens, e, attr in aligned.bindings]
    rows += [
        ("relation", f"{aligned.names[s]} {rel} {aligned.names[o]}", (s, o), rel) for s, rel, o in aligned.relations
    ]
    return rows


def verifier_score(statuses: list[ConstraintStatus]) -> tuple[int, float]:
    """Ranking key of an image: (satisfied constraints, mean score)."""
    if not statuses:
        return 0, 0.0
    return sum(s.satisfied for s in statuses), sum(s.score for s in statuses) / len(statuses)


class Verifier:
    """Interface: ``verify(image, aligned, maps)`` -> one :class:`ConstraintStatus` per constraint.

    ``needs_maps``: the pipeline passes ``(tokens, h, w)`` token maps of the generation when true;
    ``needs_image``: it decodes and passes the image (a PIL image) when true, ``None`` otherwise.
    ``heuristic``: the verdicts are a proxy, not a check of the image (the report says so).
    """

    name = "base"
    needs_maps = False
    needs_image = True
    heuristic = False

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        raise NotImplementedError

    def faulty_entities(self, statuses: list[ConstraintStatus]) -> list[int]:
        """The entities stage 2 refines: those of every failed constraint."""
        return sorted({e for s in statuses if not s.satisfied for e in s.entities})

    def rank(self, statuses: list[ConstraintStatus]) -> tuple[float, ...]:
        """The key by which the pipeline picks the better stage (higher is better)."""
        return verifier_score(statuses)


class AttentionVerifier(Verifier):
    """Constraint checks on the generation's own token maps (no extra weights).

    Args:
        peak_threshold: an entity is present when its map's peak reaches this.
        binding_threshold: an attribute is bound when softIoU(attribute, noun) reaches this.
        relation_margin: a relation holds when the centroid gap is below ``-relation_margin``.
    """

    name = "attention"
    needs_maps = True
    needs_image = False
    heuristic = True

    def __init__(self, peak_threshold: float = 0.5, binding_threshold: float = 0.3, relation_margin: float = 0.0):
        self.peak_threshold = peak_threshold
        self.binding_threshold = binding_threshold
        self.relation_margin = relation_margin

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        if maps is None:
            raise ValueError("the attention verifier needs the generation's attention maps")
        maps = maps.float()
        ents = [entity_maps(maps, tokens) for tokens in aligned.entities]
        statuses = []
        for kind, text, involved, detail in descriptions(aligned):
            if kind == "entity":
                score, threshold = float(ents[involved[0]].amax()), self.peak_threshold
                ok = score >= threshold
            elif kind == "attribute":
                score = float(soft_iou(entity_maps(maps, detail), ents[involved[0]]))
                threshold = self.binding_threshold
                ok = score >= threshold
            else:
                gap = float(relation_gap(ents[involved[0]], ents[involved[1]], detail))
                score, threshold, ok = -gap, self.relation_margin, gap < -self.relation_margin
            statuses.append(ConstraintStatus(kind, text, ok, score, involved, threshold, self.name))
        return statuses


def _load(model_class, processor_class, model: str | None, what: str, example: str, device):
    if not model:
        raise InputError(f"the {what} verifier needs weights: pass --verifier-model (e.g. {example})")
    try:
        processor = processor_class.from_pretrained(model)
        network = model_class.from_pretrained(model, use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"cannot load the {what} verifier weights {model!r} ({type(error).__name__}); download them once or "
            "pass a local folder, or use --verifier attention (no extra weights)"
        ) from None
    return processor, network


class VQAVerifier(Verifier):
    """BLIP VQA as the paper's verifier: P(yes) of a fine and a coarse question per entity.

    Per entity, the coarse question ``"is there a {noun} in the image?"`` (its ``entity`` row) and
    the fine one with its attributes, ``"is there a {attributes} {noun} in the image?"`` (one
    ``attribute`` row per attribute, all asking the entity's full fine question), are asked on the
    full image and, when the generation's attention maps are given, on the entity's attention
    crop (the box of the cells reaching ``crop_fraction`` of its map's peak); a row's score is the
    lower of the two answers, so the entity must be seen in the image and where it attended.
    Relations ask ``"is the {s} {relation} the {o}?"`` on the full image. A row holds at
    ``threshold`` (paper: 0.5); ``faulty_entities`` always returns at least the lowest-scoring
    entity (the paper refines at least one); ``rank`` is the DA-Score, the mean P(yes) of all
    questions, by which the better stage is chosen. P(yes) is BLIP's first answer token,
    ``P(yes) / (P(yes) + P(no))``.
    """

    name = "vqa"
    needs_maps = True

    def __init__(
        self,
        model: str | None,
        device: str | torch.device = "cpu",
        threshold: float = 0.5,
        crop_fraction: float = 0.5,
        min_refined: int = 1,
    ):
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.processor, self.model = _load(
            BlipForQuestionAnswering, BlipProcessor, model, "vqa", "Salesforce/blip-vqa-base", device
        )
        self.device = device
        self.threshold = threshold
        self.crop_fraction = crop_fraction
        self.min_refined = min_refined
        tokenizer = self.processor.tokenizer
        self.yes_id = tokenizer.convert_tokens_to_ids("yes")
        self.no_id = tokenizer.convert_tokens_to_ids("no")

    @torch.no_grad()
    def probability_yes(self, image, question: str) -> float:
        """P(yes) / (P(yes) + P(no)) of the answer decoder's first token."""
        inputs = self.processor(images=image, text=question, return_tensors="pt").to(self.device)
        image_embeds = self.model.vision_model(pixel_values=inputs["pixel_values"])[0]
        question_embeds = self.model.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            encoder_hidden_states=image_embeds,
        )[0]
        start = torch.tensor([[self.model.decoder_start_token_id]], device=self.device)
        logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=question_embeds).logits[0, -1]
        pair = torch.softmax(logits[[self.yes_id, self.no_id]].float(), dim=0)
        return float(pair[0])

    def questions(self, aligned: AlignedConstraints) -> list[str]:
        """The question of each row of :func:`descriptions` (coarse, fine, relation)."""
        attributes: list[list[str]] = [[] for _ in aligned.names]
        for _, entity, attribute in aligned.bindings:
            attributes[entity].append(attribute)
        asked = []
        for kind, _, involved, detail in descriptions(aligned):
            if kind == "relation":
                s, o = (aligned.names[i] for i in involved)
                asked.append(f"is the {s} {RELATION_WORDS[detail]} the {o}?")
            else:
                words = attributes[involved[0]] if kind == "attribute" else []
                asked.append(f"is there a {' '.join([*words, aligned.names[involved[0]]])} in the image?")
        return asked

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        crops: list = [None] * len(aligned.entities)
        if maps is not None:
            crops = [attention_crop(image, entity_maps(maps.float(), t), self.crop_fraction) for t in aligned.entities]
        answers: dict[tuple[str, int], float] = {}
        statuses = []
        for (kind, text, involved, _), question in zip(descriptions(aligned), self.questions(aligned)):
            views = [image] if kind == "relation" or crops[involved[0]] is None else [image, crops[involved[0]]]
            score = min(
                answers.setdefault((question, i), self.probability_yes(v, question)) for i, v in enumerate(views)
            )
            statuses.append(
                ConstraintStatus(kind, text, score >= self.threshold, score, involved, self.threshold, self.name)
            )
        return statuses

    def faulty_entities(self, statuses: list[ConstraintStatus]) -> list[int]:
        """The failed rows' entities, and at least ``min_refined`` of the lowest-scoring ones (paper: 1)."""
        faulty = super().faulty_entities(statuses)
        by_score = sorted((s.score, e) for s in statuses if s.kind != "relation" for e in s.entities)
        for _, entity in by_score:
            if len(faulty) >= self.min_refined:
                break
            faulty = sorted({*faulty, entity})
        return faulty

    def rank(self, statuses: list[ConstraintStatus]) -> tuple[float, ...]:
        """The DA-Score: the mean P(yes) over all questions."""
        return (sum(s.score for s in statuses) / len(statuses),) if statuses else (0.0,)


def attention_crop(image, entity_map: torch.Tensor, fraction: float = 0.5, margin: float = 0.1):
    """The image inside the box of the map cells reaching ``fraction`` of its peak, widened by ``margin``."""
    height, width = entity_map.shape[-2:]
    ys, xs = torch.nonzero(entity_map >= fraction * entity_map.amax(), as_tuple=True)
    box = [xs.min() / width - margin, ys.min() / height - margin, (xs.max() + 1) / width + margin]
    box.append((ys.max() + 1) / height + margin)
    left, top, right, bottom = (min(max(float(v), 0.0), 1.0) for v in box)
    return image.crop(
        (round(left * image.width), round(top * image.height), round(right * image.width), round(bottom * image.height))
    )


class DetectorVerifier(Verifier):
    """OWL-ViT: an entity (or "red car") is present when a box scores ``threshold``; relations by box centres."""

    name = "detector"

    def __init__(self, model: str | None, device: str | torch.device = "cpu", threshold: float = 0.1):
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        self.processor, self.model = _load(
            OwlViTForObjectDetection, OwlViTProcessor, model, "detector", "google/owlvit-base-patch32", device
        )
        self.device = device
        self.threshold = threshold

    @torch.no_grad()
    def detect(self, image, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Best score per query and its box centre ``(x, y)`` in [0, 1]."""
        inputs = self.processor(text=[queries], images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        scores = outputs.logits[0].sigmoid()  # (boxes, queries)
        best, index = scores.max(dim=0)
        centres = outputs.pred_boxes[0, index, :2]  # (queries, 2): cx, cy
        return best.float().cpu(), centres.float().cpu()

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        rows = descriptions(aligned)
        queries = [f"a photo of a {text}" for kind, text, _, _ in rows if kind != "relation"]
        scores, centres = self.detect(image, queries)
        statuses = []
        for index, (kind, text, involved, detail) in enumerate(rows):
            if kind != "relation":
                score = float(scores[index])
                statuses.append(ConstraintStatus(kind, text, score >= self.threshold, score, involved))
                continue
            s, o = involved
            found = scores[s] >= self.threshold and scores[o] >= self.threshold
            gap = _box_gap(centres[s], centres[o], detail)
            statuses.append(ConstraintStatus(kind, text, bool(found and gap < 0), -gap, involved))
        return statuses


def _box_gap(subject: torch.Tensor, obj: torch.Tensor, relation: str, near: float = 0.35) -> float:
    """Centre-based relation gap (< 0 satisfied), as ``refine.relation_gap`` for maps."""
    (xs, ys), (xo, yo) = subject.tolist(), obj.tolist()
    gaps = {"left": xs - xo, "right": xo - xs, "above": ys - yo, "below": yo - ys}
    return gaps.get(relation, ((xs - xo) ** 2 + (ys - yo) ** 2) ** 0.5 - near)


def make_verifier(name: str | Verifier, *, model: str | None = None, device: str | torch.device = "cpu") -> Verifier:
    """A verifier by name (``attention``, ``shapes``, ``vqa``, ``detector``) or the given instance."""
    if isinstance(name, Verifier):
        return name
    if name == "attention":
        return AttentionVerifier()
    if name == "shapes":
        from editkit.shapes.verifier import ShapesVerifier

        return ShapesVerifier()
    if name == "vqa":
        return VQAVerifier(model, device)
    if name == "detector":
        return DetectorVerifier(model, device)
    raise InputError(f"unknown verifier {name!r}; use {', '.join(VERIFIERS)}")
