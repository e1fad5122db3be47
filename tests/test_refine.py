"""Constraint losses, noise refiners, verifiers, and ComposePipeline mechanics on tiny models (CPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from editkit.constraints import AlignedConstraints
from editkit.errors import InputError, ModelLoadError
from editkit.refine import (
    LossWeights,
    binding_loss,
    centroid,
    constraint_loss,
    initno_refine,
    kl_to_standard_normal,
    map_divisor,
    map_grid,
    missing_loss,
    mixing_loss,
    refine_in_rounds,
    single_step_refine,
    soft_iou,
    spatial_loss,
    step_sizes,
    token_maps,
)
from editkit.verifiers import AttentionVerifier, ConstraintStatus, Verifier, make_verifier, verifier_score

GRIDS = [(4, 4), (16, 16), (24, 40), (32, 32)]


def blob(grid, x, y, sigma=0.12):
    """A Gaussian bump centred at (x, y) in [0, 1] coordinates (differentiable in x, y)."""
    height, width = grid
    ys = ((torch.arange(height) + 0.5) / height)[:, None]
    xs = ((torch.arange(width) + 0.5) / width)[None, :]
    bump = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return bump / bump.detach().amax()  # peak 1 on any grid


@pytest.mark.parametrize("grid", GRIDS)
def test_missing_loss(grid):
    present = [blob(grid, 0.3, 0.3), blob(grid, 0.7, 0.7)]
    assert missing_loss(present).item() < 0.05
    scale = torch.tensor(0.1, requires_grad=True)
    faint = [blob(grid, 0.3, 0.3), scale * blob(grid, 0.7, 0.7)]
    loss = missing_loss(faint)
    loss.backward()
    assert loss.item() > 0.85 and scale.grad.item() < 0  # raising the faint entity lowers the loss


@pytest.mark.parametrize("grid", GRIDS)
def test_mixing_loss_is_a_true_soft_iou(grid):
    a = blob(grid, 0.2, 0.5, sigma=0.06)
    assert soft_iou(a, a).item() == pytest.approx(1.0, abs=1e-6)  # the paper's sum(ab)/sum(a+b) caps at 0.5
    assert mixing_loss([blob(grid, 0.15, 0.5, 0.06), blob(grid, 0.85, 0.5, 0.06)]).item() < 0.05
    x = torch.tensor(0.55, requires_grad=True)
    loss = mixing_loss([blob(grid, 0.45, 0.5), blob(grid, x, 0.5)])
    loss.backward()
    assert loss.item() > 0.3 and x.grad.item() < 0  # moving the second entity away reduces mixing


@pytest.mark.parametrize("grid", GRIDS)
def test_binding_loss(grid):
    noun = blob(grid, 0.3, 0.6, sigma=0.15)
    assert binding_loss([noun.clone()], [noun]).item() < 1e-6
    x = torch.tensor(0.75, requires_grad=True)
    loss = binding_loss([blob(grid, x, 0.6, sigma=0.15)], [noun])
    loss.backward()
    assert loss.item() > 0.5 and x.grad.item() > 0  # moving the attribute towards its noun helps


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("softness", [None, 0.05])
@pytest.mark.parametrize(
    ("relation", "satisfied", "violated"),
    [
        ("left", ((0.2, 0.5), (0.8, 0.5)), ((0.92, 0.5), (0.08, 0.5))),
        ("right", ((0.8, 0.5), (0.2, 0.5)), ((0.08, 0.5), (0.92, 0.5))),
        ("above", ((0.5, 0.2), (0.5, 0.8)), ((0.5, 0.92), (0.5, 0.08))),
        ("below", ((0.5, 0.8), (0.5, 0.2)), ((0.5, 0.08), (0.5, 0.92))),
        ("near", ((0.45, 0.5), (0.55, 0.5)), ((0.05, 0.05), (0.95, 0.95))),
    ],
)
def test_spatial_loss(grid, softness, relation, satisfied, violated):
    (sx, sy), (ox, oy) = satisfied
    ok = spatial_loss(blob(grid, sx, sy), blob(grid, ox, oy), relation, softness=softness)
    assert ok.item() < (1e-6 if softness is None else 0.01)
    (sx, sy), (ox, oy) = violated  # badly violated: the gradient must not vanish
    subject = torch.tensor([sx, sy], requires_grad=True)
    loss = spatial_loss(blob(grid, subject[0], subject[1]), blob(grid, ox, oy), relation, softness=softness)
    loss.backward()
    assert loss.item() > 0.3
    wanted = {"left": (1, 0), "right": (-1, 0), "above": (0, 1), "below": (0, -1)}.get(relation)
    if wanted is None:  # near: towards the object
        wanted = (math.copysign(1, sx - ox), math.copysign(1, sy - oy))
    for axis, sign in enumerate(wanted):
        if sign:
            assert subject.grad[axis].item() * sign > 1e-3


def test_centroid_and_grid():
    grid = (8, 12)
    x, y = centroid(blob(grid, 0.25, 0.75, sigma=0.05)).tolist()
    assert x == pytest.approx(0.25, abs=0.02) and y == pytest.approx(0.75, abs=0.02)
    assert map_grid((64, 64)) == (16, 16) and map_grid((128, 96)) == (32, 24) and map_grid((16, 16)) == (4, 4)


def test_map_divisor_picks_the_lowest_cross_attention_level(sd15_pipe, sdxl_pipe):
    from types import SimpleNamespace

    assert map_divisor(sd15_pipe.unet.config) == 4  # SD 1.x: 64x64 latents -> A&E's 16x16 maps
    assert map_divisor(sdxl_pipe.unet.config) == 4  # SDXL: 128x128 latents -> 32x32
    two_levels = SimpleNamespace(down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",))
    assert map_divisor(two_levels) == 2  # a fixed quarter would leave only the mid block
    assert map_divisor(SimpleNamespace(down_block_types=("DownBlock2D",) * 3)) == 4


def test_step_sizes_follow_attend_and_excite():
    sizes = step_sizes(50)
    assert sizes[0] == pytest.approx(20.0) and sizes[-1] == pytest.approx(20 * math.sqrt(0.5))
    assert all(a >= b for a, b in itertools.pairwise(sizes))


def test_token_maps_softmax_over_real_tokens_only():
    probs = torch.rand(4, 4, 77)
    probs[..., 0] = 50.0  # start-of-text dominates the raw map; it must not enter the softmax
    maps = token_maps(probs, last_token=5, smooth=False, token_softmax_scale=1.0)
    assert maps.shape == (5, 4, 4)
    torch.testing.assert_close(maps.sum(dim=0), torch.ones(4, 4))
    expected = torch.softmax(probs[..., 1:6], dim=-1).permute(2, 0, 1)
    torch.testing.assert_close(maps, expected)
    smoothed = token_maps(probs, last_token=5, smooth=True)
    assert smoothed.shape == (5, 4, 4) and not torch.equal(smoothed, token_maps(probs, 5, smooth=False))


def _aligned():
    # tokens: 1 "red", 2 "car", 3 "blue", 4 "bird"
    return AlignedConstraints(
        entities=[[2], [4]],
        names=["car", "bird"],
        bindings=[([1], 0, "red"), ([3], 1, "blue")],
        relations=[(0, "left", 1)],
        last_token=4,
    )


def _maps(grid, car, bird, red=None, blue=None):
    red = car if red is None else red
    blue = bird if blue is None else blue
    return torch.stack([blob(grid, *red), blob(grid, *car), blob(grid, *blue), blob(grid, *bird)])


def test_constraint_loss_terms_and_selection():
    grid = (16, 16)
    good = _maps(grid, (0.2, 0.5), (0.8, 0.5))
    total, terms = constraint_loss(good, _aligned(), LossWeights())
    assert set(terms) == {"missing", "mixing", "binding", "spatial"} and total.item() < 0.05
    bad = _maps(grid, (0.8, 0.5), (0.2, 0.5), red=(0.2, 0.5))
    total, terms = constraint_loss(bad, _aligned(), LossWeights())
    assert terms["spatial"].item() > 0.3 and terms["binding"].item() > 0.45  # one of two bindings broken
    _, selective = constraint_loss(bad, _aligned(), LossWeights(), entities={1})
    assert selective["binding"].item() < 0.05  # only bird's binding (blue is on the bird) is kept
    zero, terms = constraint_loss(bad, _aligned(), LossWeights(0, 0, 0, 0))
    assert zero.item() == 0 and not terms and not LossWeights(0, 0, 0, 0).any


def _reference_constraint_loss(maps, aligned, weights, entities, near_distance=0.35):
    """The unified loss one constraint at a time, from the formulas (A&E missing, soft IoU, centroid hinge)."""
    chosen = set(range(len(aligned.entities))) if entities is None else entities
    phrase = lambda tokens: sum(maps[t - 1] for t in tokens)  # noqa: E731 - a phrase's map sums its tokens
    ents = [phrase(tokens) for tokens in aligned.entities]

    def iou(a, b):
        a, b = a / (a.max() + 1e-8), b / (b.max() + 1e-8)
        return torch.minimum(a, b).sum() / (torch.maximum(a, b).sum() + 1e-8)

    def center(a):
        h, w = a.shape
        ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
        mass = a.sum() + 1e-8
        return (a * xs[None, :]).sum() / mass, (a * ys[:, None]).sum() / mass

    terms = {}
    if chosen:
        terms["missing"] = max(1 - ents[i].max() for i in sorted(chosen))
    pairs = [(i, j) for i, j in itertools.combinations(range(len(ents)), 2) if i in chosen or j in chosen]
    if pairs and chosen:
        terms["mixing"] = sum(iou(ents[i], ents[j]) for i, j in pairs) / len(pairs)
    bindings = [(phrase(tokens), ents[e]) for tokens, e, _ in aligned.bindings if e in chosen]
    if bindings:
        terms["binding"] = sum(1 - iou(a, n) for a, n in bindings) / len(bindings)
    gaps = []
    for s, rel, o in (r for r in aligned.relations if r[0] in chosen or r[2] in chosen):
        (xs, ys), (xo, yo) = center(ents[s]), center(ents[o])
        gap = {"left": xs - xo, "right": xo - xs, "above": ys - yo, "below": yo - ys}.get(rel)
        gap = torch.sqrt((xs - xo) ** 2 + (ys - yo) ** 2 + 1e-12) - near_distance if rel == "near" else gap
        gap = gap + weights.spatial_margin
        soft = weights.spatial_softness
        gaps.append(torch.relu(gap) if soft is None else soft * torch.nn.functional.softplus(gap / soft))
    if gaps:
        terms["spatial"] = sum(gaps) / len(gaps)
    return sum(getattr(weights, k) * v for k, v in terms.items()), terms


@pytest.mark.parametrize(
    ("relations", "softness", "entities"),
    [
        ([(0, "left", 1), (2, "below", 1)], None, None),
        ([(0, "left", 1), (2, "below", 1)], None, {2}),
        ([(1, "near", 2), (0, "above", 2), (2, "right", 0)], 0.05, None),
        ([(1, "near", 2), (0, "above", 2)], None, {0, 1}),
    ],
)
def test_vectorised_constraint_loss_equals_the_per_constraint_formulas(relations, softness, entities):
    """Three entities (one of two tokens, one token repeated), two bindings, mixed relations: value and gradient."""
    generator = torch.Generator().manual_seed(2)
    maps = torch.rand(12, 6, 10, generator=generator).requires_grad_(True)
    aligned = AlignedConstraints(
        entities=[[3], [5, 6], [9, 9]], names=["cat", "dog house", "bird"], relations=relations, last_token=12,
        bindings=[([2], 0, "red"), ([8, 7], 2, "blue")], dropped=[],
    )  # fmt: skip
    weights = LossWeights(mixing=0.7, binding=0.3, spatial=1.5, spatial_margin=0.05, spatial_softness=softness)
    total, terms = constraint_loss(maps, aligned, weights, entities=entities)
    expected, expected_terms = _reference_constraint_loss(maps, aligned, weights, entities)
    assert terms.keys() == expected_terms.keys()
    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(total, maps)
    (expected_grad,) = torch.autograd.grad(expected, maps)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_single_step_refine_one_step_per_faulty_entity():
    noise = torch.randn(1, 4, 8, 8)
    calls = []

    def loss_fn(z, entities):
        calls.append(set(entities))
        return (z**2).sum() / 2  # gradient = z

    refined = single_step_refine(noise, [0, 2], loss_fn, step_size=0.1)
    assert calls == [{0}, {2}]
    torch.testing.assert_close(refined, noise * 0.9 * 0.9)


def test_initno_refine_stays_gaussian_like():
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    target = torch.ones_like(noise)

    def loss_fn(z, entities):
        return ((z - target) ** 2).mean()

    refined = initno_refine(noise, [0], loss_fn, steps=10, learning_rate=0.05, kl_weight=1.0, max_kl=0.01)
    assert ((refined - target) ** 2).mean() < ((noise - target) ** 2).mean()
    assert kl_to_standard_normal(torch.zeros(3), torch.zeros(3)).item() == 0
    assert abs(refined.std().item() - 1) < 0.2


def test_attention_verifier_on_synthetic_maps():
    grid = (16, 16)
    verifier = AttentionVerifier(peak_threshold=0.5, binding_threshold=0.3)
    good = verifier.verify(None, _aligned(), _maps(grid, (0.2, 0.5), (0.8, 0.5)))
    assert [s.kind for s in good] == ["entity", "entity", "attribute", "attribute", "relation"]
    assert all(s.satisfied for s in good)
    bad = verifier.verify(
        None,
        _aligned(),
        _maps(grid, (0.8, 0.5), (0.2, 0.5), red=(0.2, 0.5)) * torch.tensor([1, 1, 1, 0.2])[:, None, None],
    )
    verdict = {s.description: s.satisfied for s in bad}
    assert verdict == {"car": True, "bird": False, "red car": False, "blue bird": True, "car left bird": False}
    assert verifier_score(good) > verifier_score(bad)


def test_verifier_factory_errors():
    assert isinstance(make_verifier("attention"), AttentionVerifier)
    with pytest.raises(InputError, match="unknown verifier"):
        make_verifier("clip")
    with pytest.raises(InputError, match="needs weights"):
        make_verifier("vqa")
    with pytest.raises(ModelLoadError, match="cannot load the detector verifier"):
        make_verifier("detector", model="/nonexistent/owlvit")
    with pytest.raises(ModelLoadError, match="cannot load the vqa verifier"):
        make_verifier("vqa", model="/nonexistent/blip")


# -- pipeline mechanics ---------------------------------------------------------------------------
WORDS = ["red", "car", "blue", "bird", "left", "of"]
PROMPT = "a red car on the left of a blue bird"


@pytest.fixture(scope="module")
def compose_pipe():
    from editkit.testing import tiny_sd15_components
    from pipelines.compose import ComposePipeline

    parts = tiny_sd15_components(seed=0, words=WORDS)
    keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    pipe = ComposePipeline(**{k: parts[k] for k in keep})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    options = {"height": 64, "width": 64, "num_inference_steps": 4, "max_iter_to_alter": 2, "output_type": "pt"}
    options.update(kwargs)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **options)


def test_guidance_off_equals_diffusers_plain_pipeline(sd15_pipe):
    from pipelines.compose import ComposePipeline

    pipe = ComposePipeline(
        sd15_pipe.vae, sd15_pipe.text_encoder, sd15_pipe.tokenizer, sd15_pipe.unet, sd15_pipe.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 7.5, "output_type": "pt"}
    expected = sd15_pipe("a red car", generator=torch.Generator().manual_seed(3), **kwargs).images
    for off in (
        {"max_iter_to_alter": 0},
        {"missing_weight": 0, "mixing_weight": 0, "binding_weight": 0, "spatial_weight": 0},
    ):
        out = pipe("a red car", generator=torch.Generator().manual_seed(3), refine=False, **off, **kwargs)
        # bit-exact: same noise, same ops; editkit's processor equals AttnProcessor2_0 bit for bit
        assert torch.equal(out.images, expected)
        assert out.report_before is None and out.chosen == "stage1"


class _Recorder:
    def __init__(self, unet):
        self.calls: list[tuple[int, bool]] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], torch.is_grad_enabled()))


def test_grad_forwards_only_on_guided_steps(compose_pipe):
    recorder = _Recorder(compose_pipe.unet)
    try:
        guided = _generate(compose_pipe, refine=False, num_inference_steps=5, max_iter_to_alter=2)
    finally:
        recorder.handle.remove()
    grad, plain = (1, True), (2, False)
    assert recorder.calls == [grad, plain, grad, plain, plain, plain, plain]
    unguided = _generate(compose_pipe, refine=False, num_inference_steps=5, max_iter_to_alter=0)
    assert not torch.equal(guided.images, unguided.images)


def test_guided_passes_leave_the_weights_out_of_autograd(compose_pipe):
    """A model loaded for inference has requires_grad=True weights: the guidance graph must not
    include them (no weight gradients), and each flag comes back as it was."""
    unet = compose_pipe.unet
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(True)
    unet.conv_in.weight.requires_grad_(False)  # one odd flag, to check each is restored
    during = []
    handle = unet.register_forward_pre_hook(
        lambda module, args: during.append(any(p.requires_grad for p in module.parameters()))
    )
    try:
        _generate(compose_pipe, refine=False, num_inference_steps=3, max_iter_to_alter=2)
        assert during and not any(during)
        assert all(p.grad is None for p in unet.parameters())
        assert not unet.conv_in.weight.requires_grad and unet.conv_out.weight.requires_grad
    finally:
        handle.remove()
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])


def test_guided_passes_stop_after_the_last_needed_map(compose_pipe, monkeypatch):
    from editkit.refine import GuidanceMapStore

    outputs = []
    handle = compose_pipe.unet.conv_out.register_forward_hook(lambda *a: outputs.append(torch.is_grad_enabled()))
    try:
        early = _generate(compose_pipe, refine=False, num_inference_steps=4, max_iter_to_alter=3)
    finally:
        handle.remove()
    assert outputs.count(True) == 1 and outputs.count(False) == 4  # only the first guided pass runs to the end
    monkeypatch.setattr(GuidanceMapStore, "learn_last_site", lambda self: None)  # never exit early
    full = _generate(compose_pipe, refine=False, num_inference_steps=4, max_iter_to_alter=3)
    assert torch.equal(early.images, full.images)  # skipping the later layers changes nothing


def _grad_blocks(pipe, **kwargs) -> tuple[set[str], torch.Tensor]:
    """The UNet blocks that ran under autograd after the first guided pass, and the image."""
    from diffusers.models.attention_processor import Attention

    seen: list[tuple[str, bool]] = []
    handles = [
        module.register_forward_pre_hook(lambda *a, name=name: seen.append((name, torch.is_grad_enabled())))
        for name, module in pipe.unet.named_modules()
        if isinstance(module, Attention)
    ]
    try:
        out = _generate(pipe, refine=False, num_inference_steps=4, max_iter_to_alter=3, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    first_pass = len(pipe.unet.attn_processors)  # the first guided pass runs the whole UNet
    return {name.split(".")[0] for name, grad in seen[first_pass:] if grad}, out.images


def test_down_only_maps_stop_guided_passes_after_the_down_path(compose_pipe):
    default_blocks, default = _grad_blocks(compose_pipe)
    down_blocks, down = _grad_blocks(compose_pipe, attention_blocks=("down",))
    assert default_blocks == {"down_blocks", "mid_block", "up_blocks"}  # A&E: down and up maps
    assert down_blocks == {"down_blocks"}
    assert not torch.equal(default, down)  # fewer maps, another guidance signal
    with pytest.raises(InputError, match="attention blocks"):
        _generate(compose_pipe, attention_blocks=("left",))


def test_maps_captured_only_where_needed(compose_pipe, monkeypatch):
    from editkit.refine import GuidanceMapStore

    captures = []
    original = GuidanceMapStore.on_probs

    def recording(self, site, probs, queries):
        captures.append((self.step_index, torch.is_grad_enabled(), site.grid))
        return original(self, site, probs, queries)

    monkeypatch.setattr(GuidanceMapStore, "on_probs", recording)
    _generate(compose_pipe, refine=False, num_inference_steps=4, max_iter_to_alter=2)
    assert captures and {(step, grad) for step, grad, _ in captures} == {(0, True), (1, True)}
    assert {grid for *_, grid in captures} == {(2, 2)}  # 64 px: latent 8x8, a quarter of its side
    captures.clear()
    _generate(compose_pipe, refine=False, max_iter_to_alter=0)
    assert captures == []  # plain generation: no explicit-probability path at all


def test_stage2_refines_exactly_the_stage1_noise(compose_pipe, monkeypatch):
    import pipelines.compose as module

    seen = {}

    def fake_refiner(noise, faulty, loss_fn, *, step_size):
        seen["noise"], seen["faulty"] = noise, list(faulty)
        with torch.enable_grad():
            seen["loss"] = loss_fn(noise.float().requires_grad_(True), set(faulty))
        return noise + 0.5

    class AllFaulty(Verifier):
        name = "stub"

        def verify(self, image, aligned, maps):
            seen.setdefault("images", []).append(image)
            return [ConstraintStatus("entity", "bird", False, 0.0, (1,))]

    starts = []
    original = compose_pipe.denoise
    monkeypatch.setattr(module, "single_step_refine", fake_refiner)
    monkeypatch.setattr(compose_pipe, "denoise", lambda noise, *a: (starts.append(noise), original(noise, *a))[1])
    out = _generate(compose_pipe, verifier=AllFaulty())
    expected_noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.initial_noise, expected_noise) and seen["noise"] is out.initial_noise
    assert starts[0] is out.initial_noise and torch.equal(starts[1], out.initial_noise + 0.5)
    assert seen["faulty"] == [1] and seen["loss"].requires_grad
    assert torch.equal(out.refined_noise, out.initial_noise + 0.5)
    assert out.chosen == "stage1" and len(out.report_after) == 1  # tie: the stage-1 image is kept
    assert all(image.size == (64, 64) for image in seen["images"])  # model verifiers get decoded images


class _Scripted(Verifier):
    """Fails the entities listed per call, in order (one constraint per entity of two)."""

    name = "scripted"

    def __init__(self, failing_per_call):
        self.failing = list(failing_per_call)

    def verify(self, image, aligned, maps):
        failing = self.failing.pop(0)
        return [ConstraintStatus("entity", str(e), e not in failing, float(e not in failing), (e,)) for e in (0, 1)]


def test_refine_in_rounds_chains_the_rounds_and_keeps_the_best():
    verifier = _Scripted([{1}, {0, 1}, {0, 1}])  # round 1 fixes entity 0, round 2 breaks it again
    calls = []

    def refine(noise, faulty):
        calls.append((noise.clone(), list(faulty)))
        return noise + 1

    def regenerate(noise):
        return noise * 10, verifier.verify(None, None, None)

    latents, noise, report = refine_in_rounds(torch.zeros(1), [0, 1], 3, refine, regenerate, verifier)
    assert [(n.item(), f) for n, f in calls] == [(0.0, [0, 1]), (1.0, [1]), (2.0, [0, 1])]  # each from the last
    assert noise.item() == 1.0 and latents.item() == 10.0  # round 1 ranks best (1 of 2 satisfied)
    assert [s.satisfied for s in report] == [True, False]


def test_refine_in_rounds_stops_when_everything_holds_or_on_interrupt():
    verifier = _Scripted([set(), {1}])
    rounds = []

    def refine(noise, faulty):
        rounds.append(list(faulty))
        return noise + 1

    def regenerate(noise):
        return noise, verifier.verify(None, None, None)

    _, noise, _ = refine_in_rounds(torch.zeros(1), [1], 5, refine, regenerate, verifier)
    assert rounds == [[1]] and noise.item() == 1.0  # round 1's image satisfies every constraint: no round 2
    assert refine_in_rounds(torch.zeros(1), [], 5, refine, regenerate, verifier) is None  # nothing faulty
    assert refine_in_rounds(torch.zeros(1), [1], 5, refine, regenerate, verifier, stop=lambda: True) is None


def test_noise_refinement_rounds_in_the_pipeline(compose_pipe, monkeypatch):
    import pipelines.compose as module

    starts = []

    def shifting_refiner(noise, faulty, loss_fn, *, step_size):
        return noise + 0.5

    class StillFaulty(Verifier):
        name = "stub"

        def verify(self, image, aligned, maps):
            return [ConstraintStatus("entity", "bird", False, -float(len(starts)), (1,))]  # worse every round

    original = compose_pipe.denoise
    monkeypatch.setattr(module, "single_step_refine", shifting_refiner)
    monkeypatch.setattr(compose_pipe, "denoise", lambda noise, *a: (starts.append(noise), original(noise, *a))[1])
    out = _generate(compose_pipe, verifier=StillFaulty(), noise_refinement_rounds=3)
    assert len(starts) == 4  # stage 1, then one generation per round, each from the previous round's noise
    assert all(torch.allclose(start, out.initial_noise + 0.5 * k) for k, start in enumerate(starts))
    assert torch.equal(out.refined_noise, out.initial_noise + 0.5)  # the best round (the first) is reported
    assert out.chosen == "stage1"


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_noise_refinement_rounds_must_be_a_positive_integer(compose_pipe, rounds):
    with pytest.raises(InputError, match="noise_refinement_rounds"):
        _generate(compose_pipe, noise_refinement_rounds=rounds)


def test_report_and_selection_with_attention_verifier(compose_pipe):
    out = _generate(
        compose_pipe, verifier=AttentionVerifier(peak_threshold=0.99), noise_refiner="initno", initno_steps=2
    )
    assert [s.description for s in out.report_before] == ["car", "bird", "red car", "blue bird", "car left bird"]
    assert out.report_after is not None and out.refined_noise is not None  # peaks of 0.99 fail on a random model
    before, after = verifier_score(out.report_before), verifier_score(out.report_after)
    assert out.chosen == ("refined" if after > before else "stage1")


def test_losses_in_fp32_with_a_half_precision_unet(monkeypatch):
    import editkit.loss_presets as module
    from editkit.testing import tiny_sd15_components
    from pipelines.compose import ComposePipeline

    parts = tiny_sd15_components(seed=0, words=WORDS)
    pipe = ComposePipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.to(torch.bfloat16)
    dtypes = []
    original = module.constraint_loss
    monkeypatch.setattr(
        module, "constraint_loss", lambda maps, *a, **k: (dtypes.append(maps.dtype), original(maps, *a, **k))[1]
    )
    out = _generate(pipe, refine=False, output_type="latent")
    assert dtypes == [torch.float32, torch.float32] and out.images.dtype == torch.bfloat16


def test_no_entity_runs_unguided_with_a_warning(compose_pipe, caplog):
    out = _generate(compose_pipe, refine=True)
    with caplog.at_level("WARNING"):
        plain = compose_pipe(
            "a photo",
            height=64,
            width=64,
            num_inference_steps=3,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )
    assert any("no entity" in w for w in plain.warnings) and "no entity" in caplog.text
    assert plain.report_before is None and out.report_before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "non-empty"),
        ({"height": 60}, "multiples of 8"),
        ({"max_iter_to_alter": 9}, "max_iter_to_alter"),
        ({"verifier": "clip"}, "verifier must be"),
        ({"noise_refiner": "adam"}, "unknown noise refiner"),
        ({"constraints": {"entities": ["boat"]}}, "does not occur"),
    ],
)
def test_bad_inputs(compose_pipe, kwargs, message):
    call = {"prompt": PROMPT, "height": 64, "width": 64, "num_inference_steps": 4, **kwargs}
    with pytest.raises(InputError, match=message):
        compose_pipe(**call)


def test_from_pretrained_both_families_and_from_pipe(sd15_dir, sdxl_dir, sd15_pipe):
    from pipelines.compose import ComposePipeline

    sd = ComposePipeline.from_pretrained(sd15_dir)
    assert sd.text_encoder_2 is None and sd.tokenizer_2 is None
    xl = ComposePipeline.from_pretrained(sdxl_dir)
    assert xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    xl.set_progress_bar_config(disable=True)
    out = xl(
        "a red car and a blue bird",
        height=64,
        width=64,
        num_inference_steps=2,
        max_iter_to_alter=1,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    piped = ComposePipeline.from_pipe(sd15_pipe)
    assert piped.unet is sd15_pipe.unet


def test_random_direction_control_keeps_each_refinement_length_and_restores_the_refiners():
    """The benchmarks' ablation: a step of the refiner's own length in a seeded random direction, undone on exit."""
    import types

    from benchmarks.compose import random_direction_refiners

    push = torch.arange(16.0).reshape(1, 1, 4, 4)

    def towards_loss(noise, faulty, loss_fn, **kwargs):
        return noise + push

    module = types.SimpleNamespace(initno_refine=towards_loss, single_step_refine=towards_loss)
    noise = torch.zeros(1, 1, 4, 4)
    runs = []
    for _ in range(2):
        with random_direction_refiners(module, seed=3):
            steps = [module.initno_refine(noise, [0], None) - noise, module.single_step_refine(noise, [0], None)]
        runs.append(steps)
        assert module.initno_refine is towards_loss and module.single_step_refine is towards_loss
    for step in runs[0]:
        assert torch.allclose(step.norm(), push.norm())
        cosine = torch.nn.functional.cosine_similarity(step.flatten(), push.flatten(), dim=0)
        assert abs(cosine) < 0.9  # not the refiner's direction
    assert not torch.allclose(runs[0][0], runs[0][1])  # a new direction per call
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # seeded: the same draws again
