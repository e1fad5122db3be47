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

    ``needs_maps``: the pipeline passes ``(tokens, h, w)`` token maps of the generation when true.
    ``heuristic``: the verdicts are a proxy, not a check of the image (the report says so).
    """

    name = "base"
    needs_maps = False
    heuristic = False

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        raise NotImplementedError

    def faulty_entities(self, statuses: list[ConstraintStatus]) -> list[int]:
        """The entities stage 2 refines: those of every failed constraint."""
        return sorted({e for s in statuses if not s.satisfied for e in s.entities})


class AttentionVerifier(Verifier):
    """Constraint checks on the generation's own token maps (no extra weights).

    Args:
        peak_threshold: an entity is present when its map's peak reaches this.
        binding_threshold: an attribute is bound when softIoU(attribute, noun) reaches this.
        relation_margin: a relation holds when the centroid gap is below ``-relation_margin``.
    """

    name = "attention"
    needs_maps = True
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
    """BLIP VQA: a constraint holds when P(yes) to its question reaches ``threshold`` (paper: 0.5)."""

    name = "vqa"

    def __init__(self, model: str | None, device: str | torch.device = "cpu", threshold: float = 0.5):
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.processor, self.model = _load(
            BlipForQuestionAnswering, BlipProcessor, model, "vqa", "Salesforce/blip-vqa-base", device
        )
        self.device = device
        self.threshold = threshold
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

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        statuses = []
        for kind, text, involved, detail in descriptions(aligned):
            if kind == "relation":
                s, o = (aligned.names[i] for i in involved)
                question = f"is the {s} {RELATION_WORDS[detail]} the {o}?"
            else:
                question = f"is there a {text}?"
            score = self.probability_yes(image, question)
            statuses.append(ConstraintStatus(kind, text, score >= self.threshold, score, involved))
        return statuses


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
