"""The paper's loss preset, checked against values computed by hand from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from editkit.constraints import AlignedConstraints
from editkit.loss_presets import PAPER_WEIGHTS, paper_constraint_loss, paper_token_maps, preset_weights
from editkit.refine import LossWeights


def _probs() -> torch.Tensor:
    """(1, 2, 5) attention: keys = start, tokens 1-3 (3 is padding in the paper's softmax), last.

    Cell 0 gives tokens 1..3 the logits (ln 2, 0, 0): T=1 softmax (1/2, 1/4, 1/4). Cell 1 gives
    (0, 0, ln 3): (1/5, 1/5, 3/5). The start and last keys are large: the paper's maps skip them.
    """
    cell0 = [3.0, math.log(2), 0.0, 0.0, 5.0]
    cell1 = [3.0, 0.0, 0.0, math.log(3), 5.0]
    return torch.tensor([[cell0, cell1]])


def _aligned(relations=()):
    # entity A = token 1, entity B = token 3, attribute token 2 -> A; last real token 2 (3 is padding)
    return AlignedConstraints([[1], [3]], ["A", "B"], [([2], 0, "attr")], list(relations), last_token=2)


def test_paper_maps_are_a_temperature_1_softmax_over_tokens_1_to_k_minus_2():
    maps = paper_token_maps(_probs())
    expected = torch.tensor([[[0.5, 0.2]], [[0.25, 0.2]], [[0.25, 0.6]]])
    torch.testing.assert_close(maps, expected)


def test_paper_loss_values_by_hand_without_relation():
    total, terms = paper_constraint_loss(_probs(), _aligned())
    # A = [0.5, 0.2], attr = [0.25, 0.2], B = [0.25, 0.6]
    # missing: peaks x1000 = 500, 600; relu(600 - 500) + relu(500 - 600) = 100
    # mixing: (0.5 * 0.25 + 0.2 * 0.6) / (0.5 + 0.2 + 0.25 + 0.6) = 0.245 / 1.55
    # binding: 1 - (min 0.25 + min 0.2) / (max 0.5 + max 0.2) = 1 - 0.45 / 0.7
    expected = {"missing": 100.0, "mixing": 0.245 / 1.55, "binding": 1 - 0.45 / 0.7}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-5)  # all weights 1


@pytest.mark.parametrize(("relation", "expected"), [("left", 1 / (1 + math.e)), ("right", 1 / (1 + math.exp(-1)))])
def test_paper_spatial_loss_by_hand_and_no_mixing_with_a_relation(relation, expected):
    # x100 maps: A is all on cell 0 (x = 0.25), B all on cell 1 (x = 0.75): 2 cells wide, so the
    # centroid difference is 1 cell; "A left of B" holds: sigmoid(-1); "A right of B": sigmoid(+1)
    total, terms = paper_constraint_loss(_probs(), _aligned([(0, relation, 1)]))
    assert "mixing" not in terms  # the paper: mixing only without spatial constraints
    assert terms["spatial"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(100.0 + (1 - 0.45 / 0.7) + expected, rel=1e-5)


def test_paper_selective_loss_keeps_only_the_chosen_entity_terms():
    _, terms = paper_constraint_loss(_probs(), _aligned([(0, "left", 1)]), entities={1})
    assert terms["missing"].item() == 0.0  # B's peak (600) already reaches A's (500)
    assert "binding" not in terms  # the attribute binds A, not B
    assert terms["spatial"].item() == pytest.approx(1 / (1 + math.e), rel=1e-5)


def test_preset_weights():
    assert vars(preset_weights("paper")) == vars(PAPER_WEIGHTS)
    assert (PAPER_WEIGHTS.missing, PAPER_WEIGHTS.mixing, PAPER_WEIGHTS.binding, PAPER_WEIGHTS.spatial) == (1, 1, 1, 1)
    assert preset_weights("attend-excite") == LossWeights()
    assert preset_weights("paper", mixing=0.25, binding=None).mixing == 0.25
    assert preset_weights("paper", binding=None).binding == 1.0
    with pytest.raises(ValueError, match="unknown loss preset"):
        preset_weights("a&e")


def test_pipeline_paper_preset_uses_the_paper_loss(monkeypatch):
    import editkit.loss_presets as presets
    from editkit.errors import InputError
    from editkit.testing import tiny_sd15_components
    from pipelines.compose import ComposePipeline

    parts = tiny_sd15_components(seed=0, words=["red", "car", "blue", "bird", "left", "of"])
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = ComposePipeline(**{k: parts[k] for k in keep})
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original = presets.paper_constraint_loss

    def spy(probs, aligned, weights, **kwargs):
        calls.append((probs.shape, weights))
        return original(probs, aligned, weights, **kwargs)

    monkeypatch.setattr(presets, "paper_constraint_loss", spy)
    options = {"height": 64, "width": 64, "num_inference_steps": 4, "max_iter_to_alter": 2, "output_type": "pt"}
    prompt = "a red car on the left of a blue bird"
    paper = pipe(prompt, generator=torch.Generator().manual_seed(0), loss_preset="paper", refine=False, **options)
    assert len(calls) == 2 and calls[0][0][-1] == 77  # raw (h, w, keys) attention, one per guided step
    assert vars(calls[0][1]) == {**vars(PAPER_WEIGHTS), "spatial_margin": 0.1}
    other = pipe(prompt, generator=torch.Generator().manual_seed(0), refine=False, **options)
    assert len(calls) == 2 and not torch.equal(paper.images, other.images)
    with pytest.raises(InputError, match="unknown loss preset"):
        pipe(prompt, loss_preset="syngen", **options)
