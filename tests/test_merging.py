"""Merging invariants and oracles: task vectors, averaging, Task Arithmetic, TIES, DARE, R2M, Gram cache."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lorax_cil.merging import (
    GramCache,
    TaskVector,
    apply_task_vector,
    average_heads,
    dare,
    load_merge_result,
    merge,
    r2m,
    real_projection,
    save_merge_result,
    task_arithmetic,
    task_vector_from_lora_state_dict,
    task_vector_from_state_dicts,
    task_vectors_from_expandable,
    ties,
    weight_average,
)
from lorax_cil.merging.methods import dare_drop
from lorax_cil.merging.r2m_merge import plain_mean_keys, truncate_matrix, truncation_rank

SHAPES = {
    "patch_embed.proj.weight": (6, 3, 2, 2),
    "blocks.0.norm1.weight": (6,),
    "blocks.0.norm1.bias": (6,),
    "blocks.0.attn.qkv.weight": (18, 6),
    "blocks.0.attn.qkv.bias": (18,),
    "blocks.0.mlp.fc1.weight": (24, 6),
    "blocks.0.mlp.fc2.weight": (6, 24),
}
REAL = [k for k in SHAPES if "norm" not in k]
MATRICES = ["blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"]


def make_tv(name: str, seed: int, *, shared: TaskVector | None = None, dtype=torch.float32) -> TaskVector:
    g = torch.Generator().manual_seed(seed)
    deltas = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}
    if shared is not None:
        deltas = {k: v + shared[k] for k, v in deltas.items()}
    head = {"weight": torch.randn(2, 6, generator=g), "bias": torch.randn(2, generator=g)}
    return TaskVector(deltas=deltas, head=head, name=name)


def make_tvs(n: int = 3, seed: int = 0, dtype=torch.float32) -> list[TaskVector]:
    shared = make_tv("shared", 1000 + seed, dtype=dtype) * 2.0
    return [make_tv(f"s{i}", seed * 100 + i, shared=shared, dtype=dtype) for i in range(n)]


def assert_tv_close(a: TaskVector, b: TaskVector, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() or set(a.keys()) == set(b.keys())
    for k in a.keys():
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# every method with options for which merging one specialist returns it exactly
IDENTITY_CASES = [
    ("average", {}),
    ("task_arithmetic", {"lam": 1.0}),
    ("ties", {"top_k": 1.0, "lam": 1.0}),
    ("dare", {"p": 0.0, "base_method": "task_arithmetic", "lam": 1.0}),
    ("dare", {"p": 0.0, "base_method": "average"}),
    ("r2m", {"rho": None}),
    ("r2m", {"rho": 0.1}),
    ("r2m", {"residual": "project", "k": 1}),
    ("r2m", {"norm_match": False, "eta_mode": "fixed", "alpha": 0.6}),
]
# default options of every method (for the order test)
ALL_CASES = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("dare", {"p": 0.3, "seed": 7}),
    ("dare", {"p": 0.3, "seed": 7, "base_method": "average"}),
    ("r2m", {}),
    ("r2m", {"k": 2, "center": True, "residual": "project", "rho": 0.2, "eta_mode": "fixed"}),
    ("r2m", {"norm_match": False, "exclude_biases": True}),
]


# --- invariants common to every method -------------------------------------------------------
@pytest.mark.parametrize("method,options", IDENTITY_CASES)
def test_merging_one_specialist_returns_it(method, options):
    tv = make_tvs(1)[0]
    res = merge(method, [tv], **options)
    assert_tv_close(res.task_vector, tv)
    assert all(torch.equal(res.head[k], tv.head[k]) for k in tv.head)
    assert res.sources == ["s0"] and res.method == method


@pytest.mark.parametrize("method,options", [
    ("ties", {"top_k": 0.2}),  # trimming keeps only the top 20 % of entries
    ("dare", {"p": 0.5}),  # random drop: identity only in expectation
    ("r2m", {"center": True}),  # centred M of one specialist is 0: no Real direction
])
def test_documented_exceptions_to_the_identity(method, options):
    tv = make_tvs(1)[0]
    out = merge(method, [tv], **options).task_vector
    assert not all(torch.allclose(out[k], tv[k]) for k in tv.keys())


@pytest.mark.parametrize("method,options", ALL_CASES)
def test_result_does_not_depend_on_the_specialists_order(method, options):
    tvs = make_tvs(4)
    a = merge(method, tvs, **options)
    b = merge(method, tvs[::-1], **options)
    c = merge(method, [tvs[2], tvs[0], tvs[3], tvs[1]], **options)
    assert_tv_close(a.task_vector, b.task_vector, atol=1e-4)
    assert_tv_close(a.task_vector, c.task_vector, atol=1e-4)
    for k in a.head:
        torch.testing.assert_close(a.head[k], b.head[k])


def test_weight_average_is_the_mean_and_task_arithmetic_the_scaled_sum():
    tvs = make_tvs(3)
    avg, ta = weight_average(tvs).task_vector, task_arithmetic(tvs, lam=0.4).task_vector
    for k in SHAPES:
        torch.testing.assert_close(avg[k], (tvs[0][k] + tvs[1][k] + tvs[2][k]) / 3)
        torch.testing.assert_close(ta[k], 0.4 * (tvs[0][k] + tvs[1][k] + tvs[2][k]))
    torch.testing.assert_close(avg.head["weight"], sum(tv.head["weight"] for tv in tvs) / 3)


def test_inputs_are_checked_and_dtypes_kept():
    tvs = make_tvs(2, dtype=torch.float64)
    assert weight_average(tvs).task_vector["blocks.0.attn.qkv.weight"].dtype == torch.float64
    with pytest.raises(ValueError, match="distinct"):
        weight_average([tvs[0], tvs[0]])
    odd = tvs[1].replace(deltas={**tvs[1].deltas, "blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        weight_average([tvs[0], odd])
    with pytest.raises(ValueError, match="valid: .*average.*r2m"):
        merge("fisher", tvs)
    one_logit = tvs[1].replace(head={"weight": torch.zeros(1, 6), "bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="1-logit"):
        average_heads([tvs[0], one_logit])


# --- TIES and DARE ---------------------------------------------------------------------------
def _vec(name, values):
    return TaskVector(deltas={"w": torch.tensor(values)}, name=name)


@pytest.mark.parametrize("top_k,expected", [
    (1.0, [-4.0, 1.25, 3.0, 0.5, 2.0]),  # no trimming
    (0.4, [-4.0, -2.0, 3.0, 0.0, 2.0]),  # keep 2 of 5 entries per task vector
])
def test_ties_sign_election_and_disjoint_mean_by_hand(top_k, expected):
    tvs = [_vec("a", [1.0, -2.0, 3.0, 0.5, -1.0]),
           _vec("b", [2.0, 1.5, -1.0, -0.5, -0.8]),
           _vec("c", [-4.0, 1.0, -1.2, 0.5, 2.0])]
    out = ties(tvs, top_k=top_k, lam=1.0).task_vector["w"]
    torch.testing.assert_close(out, torch.tensor(expected))
    # an entry whose elected sign is 0 (the masses cancel) stays 0
    zero = ties([_vec("a", [1.0, 2.0]), _vec("b", [-1.0, 1.0])], top_k=1.0).task_vector["w"]
    torch.testing.assert_close(zero, torch.tensor([0.0, 1.5]))


def test_dare_rescaling_preserves_the_expectation():
    p, n = 0.3, 200_000
    tv = TaskVector(deltas={"w": torch.ones(n)}, name="x")
    out = dare_drop(tv, p=p, seed=0)["w"]
    kept = float((out != 0).float().mean())
    sigma = math.sqrt(p / (1 - p) / n)  # std of the mean of n i.i.d. rescaled Bernoulli entries
    assert abs(float(out.mean()) - 1.0) < 5 * sigma
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))


def test_dare_is_reproducible_and_seeded_by_specialist_identity():
    tvs = make_tvs(2)
    a, b = dare(tvs, p=0.5, seed=3), dare(tvs, p=0.5, seed=3)
    c = dare(tvs, p=0.5, seed=4)
    k = "blocks.0.mlp.fc1.weight"
    assert torch.equal(a.task_vector[k], b.task_vector[k])
    assert not torch.equal(a.task_vector[k], c.task_vector[k])
    # the mask of one specialist is the same whatever else is merged with it
    alone = dare_drop(tvs[0], p=0.5, seed=3)[k]
    with_other = dare_drop(tvs[0], p=0.5, seed=3)[k]
    assert torch.equal(alone, with_other)
    with pytest.raises(ValueError, match="base_method"):
        dare(tvs, base_method="median")


# --- R2M ---------------------------------------------------------------------------------------
def _flat(tvs, keys):
    return torch.stack([torch.cat([tv[k].double().reshape(-1) for k in keys]) for tv in tvs])


def _svd_core(m: torch.Tensor, k: int, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct SVD oracle: (Pi tau_bar, V_k) of the (centred) task matrix."""
    tbar = m.mean(0)
    mc = m - tbar if center else m
    _, _, vh = torch.linalg.svd(mc, full_matrices=False)
    vk = vh[:k].T
    return vk @ (vk.T @ tbar), vk


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("center", [False, True])
def test_gram_path_equals_direct_svd(k, center):
    tvs = make_tvs(4, seed=5, dtype=torch.float64)
    m = _flat(tvs, REAL)
    proj = real_projection(GramCache.build(tvs).gram(REAL), k=k, center=center)
    want, vk = _svd_core(m, k, center)
    torch.testing.assert_close(m.T @ proj.core, want, atol=1e-9, rtol=1e-9)
    for i in range(4):  # Pi tau_i
        torch.testing.assert_close(m.T @ proj.q[:, i], vk @ (vk.T @ m[i]), atol=1e-9, rtol=1e-9)


def _reference_r2m(tvs, *, k, center, residual, rho, norm_match, eta_mode, alpha):
    """Dense oracle of the whole algorithm on the flattened Real keys."""
    m = _flat(tvs, REAL)
    core, vk = _svd_core(m, k, center)
    res = m - core if residual == "subtract" else m - (m @ vk) @ vk.T
    chunks, start = [], 0
    for key in REAL:
        size = math.prod(SHAPES[key])
        part = res[:, start:start + size]
        if rho is not None and key in MATRICES:
            rows = []
            for r in part:
                u, s, vh = torch.linalg.svd(r.reshape(SHAPES[key]), full_matrices=False)
                q = truncation_rank(SHAPES[key], rho)
                rows.append(((u[:, :q] * s[:q]) @ vh[:q]).reshape(-1))
            part = torch.stack(rows)
        chunks.append(part)
        start += size
    res = torch.cat(chunks, dim=1)
    norms = res.norm(dim=1)
    scales = norms.mean() / norms if norm_match else torch.ones_like(norms)
    rbar = (scales[:, None] * res).mean(0)
    eta = alpha * core.norm() / rbar.norm() if eta_mode == "norm_ratio" else alpha
    return core + eta * rbar, float(eta)


@pytest.mark.parametrize("options", [
    dict(k=1, center=False, residual="subtract", rho=0.1, norm_match=True, eta_mode="norm_ratio", alpha=0.6),
    dict(k=2, center=False, residual="project", rho=None, norm_match=False, eta_mode="fixed", alpha=0.4),
    dict(k=1, center=True, residual="subtract", rho=0.2, norm_match=False, eta_mode="norm_ratio", alpha=0.8),
    dict(k=2, center=True, residual="project", rho=0.5, norm_match=True, eta_mode="fixed", alpha=0.6),
])
def test_r2m_matches_a_dense_svd_oracle(options):
    tvs = make_tvs(4, seed=2, dtype=torch.float64)
    res = r2m(tvs, **options)
    want, eta = _reference_r2m(tvs, **options)
    torch.testing.assert_close(_flat([res.task_vector], REAL)[0], want, atol=1e-8, rtol=1e-8)
    assert res.info["eta"] == pytest.approx(eta)
    for key in ("blocks.0.norm1.weight", "blocks.0.norm1.bias"):  # plain mean, outside the estimate
        torch.testing.assert_close(res.task_vector[key], sum(tv[key] for tv in tvs) / 4)
    if options["eta_mode"] == "norm_ratio":
        assert res.info["eta"] * res.info["residual_bar_norm"] == pytest.approx(
            options["alpha"] * res.info["core_norm"])


def test_r2m_core_of_identical_specialists_is_their_task_vector():
    tv = make_tvs(1)[0]
    same = [tv.replace(name=f"copy{i}") for i in range(3)]
    res = r2m(same, center=False)
    assert_tv_close(res.task_vector, tv)
    assert res.info["core_norm"] == pytest.approx(tv.norm(REAL), rel=1e-5)
    assert res.info["eta"] == 0.0  # residuals are numerical noise and are dropped
    # centred: C M = 0, so there is no Real direction: the core is 0 and the residuals are tau
    cen = r2m(same, center=True, rho=None)
    assert cen.info["rank_used"] == 0 and cen.info["core_norm"] == 0.0
    for k in REAL:  # norm_ratio: eta = alpha * 0 / |r_bar| = 0, the Real keys fall back to theta_0
        assert torch.count_nonzero(cen.task_vector[k]) == 0
    fixed = r2m(same, center=True, rho=None, eta_mode="fixed", alpha=0.6)
    assert_tv_close(fixed.task_vector.replace(deltas={k: fixed.task_vector[k] for k in REAL}),
                    (0.6 * tv).replace(deltas={k: 0.6 * tv[k] for k in REAL}))


def test_rank_truncation_keeps_exactly_q_singular_values():
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    us, vh, q = truncate_matrix(x, 0.25)
    assert q == 3 == truncation_rank((20, 12), 0.25)
    approx = us @ vh
    assert int(torch.linalg.matrix_rank(approx)) == 3
    torch.testing.assert_close(torch.linalg.svdvals(approx)[:3], torch.linalg.svdvals(x)[:3])
    assert truncation_rank((5, 40), 0.1) == 1  # max(1, floor(0.5))
    res = r2m(make_tvs(3), rho=0.1)
    assert res.info["truncated"] == {k: truncation_rank(SHAPES[k], 0.1) for k in MATRICES}


def test_plain_mean_keys_and_bias_option():
    keys = ["blocks.0.norm1.weight", "norm.bias", "transformer.resblocks.0.ln_1.weight", "ln_post.bias",
            "encoder.LayerNorm.weight", "bn1.weight", "_blocks.3._bn0.bias", "blocks.0.attn.qkv.weight",
            "blocks.0.attn.qkv.bias", "attn.in_proj_bias", "linear.weight", "_blocks.3._expand_conv.weight"]
    assert plain_mean_keys(keys) == keys[:7]
    biases = ["blocks.0.attn.qkv.bias", "attn.in_proj_bias"]
    assert plain_mean_keys(keys, exclude_biases=True) == keys[:7] + biases
    tvs = make_tvs(3)
    res = r2m(tvs, exclude_biases=True)
    torch.testing.assert_close(res.task_vector["blocks.0.attn.qkv.bias"],
                               sum(tv["blocks.0.attn.qkv.bias"] for tv in tvs) / 3)
    with pytest.raises(ValueError, match="residual must be one of"):
        r2m(tvs, residual="orthogonal")


# --- Gram cache --------------------------------------------------------------------------------
def test_gram_cache_extension_equals_recomputation(tmp_path):
    # float64: the cached and the recomputed merge sum the same terms in different orders, so
    # they agree to the rounding error of the sums (~1e-16 relative here, ~1e-7 in float32,
    # where a fixed atol of 1e-5 failed on some thread counts); the tolerance below is 1e-10.
    tvs = make_tvs(4, seed=3, dtype=torch.float64)
    cache = GramCache.build(tvs[:3])
    grown = cache.extend(tvs[3], tvs[:3])
    full = GramCache.build(tvs)
    assert grown.sources == full.sources
    for k in full.keys():
        torch.testing.assert_close(grown.blocks[k], full.blocks[k])
        assert torch.equal(grown.blocks[k][:3, :3], cache.blocks[k])  # old entries reused as they were
    grown.save(tmp_path / "gram")
    loaded = GramCache.load(tmp_path / "gram")
    assert loaded.sources == grown.sources
    assert all(torch.equal(loaded.blocks[k], grown.blocks[k]) for k in full.keys())
    # re-merging with the cache gives the same result as from scratch, in any order
    a, b = r2m(tvs, gram=loaded), r2m(tvs[::-1])
    assert a.info["gram_reused"] and not b.info["gram_reused"]
    assert_tv_close(a.task_vector, b.task_vector, atol=1e-10, rtol=1e-10)
    stale = [tvs[0] * 2.0] + tvs[1:3]
    stale[0].name = "s0"
    with pytest.raises(ValueError, match="stale"):
        cache.extend(tvs[3], stale)
    with pytest.raises(ValueError, match="stale"):
        r2m(stale + [tvs[3]], gram=loaded)
    with pytest.raises(ValueError, match="already cached"):
        cache.extend(tvs[0], tvs[:3])


def test_merge_result_round_trip(tmp_path):
    tvs = make_tvs(3)
    res = r2m(tvs, k=2)
    save_merge_result(tmp_path / "m", res, meta={"base": "vit-test"})
    back = load_merge_result(tmp_path / "m")
    assert back.method == "r2m" and back.options == res.options and back.sources == res.sources
    assert back.info["eta"] == res.info["eta"]
    assert all(torch.equal(back.task_vector[k], res.task_vector[k]) for k in SHAPES)
    assert all(torch.equal(back.head[k], res.head[k]) for k in res.head)
    assert back.gram is not None and back.gram.sources == ["s0", "s1", "s2"]
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["base"] == "vit-test"


# --- task vectors ------------------------------------------------------------------------------
def test_task_vector_from_state_dicts_and_apply():
    base = {"a.weight": torch.randn(3, 2), "bn.running_mean": torch.zeros(2),
            "bn.num_batches_tracked": torch.tensor(5), "h.weight": torch.ones(2, dtype=torch.float16)}
    ft = {k: v + 1 if torch.is_floating_point(v) else v + 1 for k, v in base.items()}
    tv = task_vector_from_state_dicts(base, ft, name="x")
    assert tv.keys() == ["a.weight", "h.weight"]  # running statistics and integers left out
    assert tv["h.weight"].dtype == torch.float32
    theta = apply_task_vector(base, tv)
    torch.testing.assert_close(theta["a.weight"], ft["a.weight"])
    assert theta["h.weight"].dtype == torch.float16 and theta["bn.running_mean"] is base["bn.running_mean"]
    assert torch.equal(base["a.weight"] + 1, ft["a.weight"])  # caller's dict untouched
    with pytest.raises(ValueError, match="'extra'"):
        task_vector_from_state_dicts(base, {**ft, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="'a.weight'.*shape"):
        task_vector_from_state_dicts(base, {**ft, "a.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="'zzz.weight'"):
        apply_task_vector(base, tv.replace(deltas={"zzz.weight": torch.zeros(1)}))
    s = (tv + tv - tv) * 2.0 / 2.0
    torch.testing.assert_close(s["a.weight"], tv["a.weight"])
    assert s.head is None and tv.dot(tv) == pytest.approx(tv.norm() ** 2)


def test_lora_state_dict_and_refusals():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g)
    sd = {"base_model.model.blocks.0.attn.qkv.lora_A.default.weight": a,
          "base_model.model.blocks.0.attn.qkv.lora_B.default.weight": b}
    tv = task_vector_from_lora_state_dict(sd, {"r": 4, "lora_alpha": 8}, strip_prefix="base_model.model.",
                                          name="p")
    torch.testing.assert_close(tv["blocks.0.attn.qkv.weight"], 2.0 * b @ a)
    rs = task_vector_from_lora_state_dict(sd, {"r": 4, "alpha": 8, "use_rslora": True}, name="p")
    torch.testing.assert_close(rs["base_model.model.blocks.0.attn.qkv.weight"], 4.0 * b @ a)
    with pytest.raises(ValueError, match="DoRA"):
        task_vector_from_lora_state_dict({**sd, "x.lora_magnitude_vector.default.weight": torch.ones(5)},
                                         {"r": 4, "alpha": 8})
    with pytest.raises(ValueError, match="DoRA"):
        task_vector_from_lora_state_dict(sd, {"r": 4, "alpha": 8, "use_dora": True})
    # the recorded scaling is alpha/sqrt(r) but the flag says alpha/r
    with pytest.raises(ValueError, match="use_rslora"):
        task_vector_from_lora_state_dict(sd, {"r": 4, "alpha": 8, "scaling": 4.0})
    with pytest.raises(ValueError, match="rank 4 .* r=8"):
        task_vector_from_lora_state_dict(sd, {"r": 8, "alpha": 8})


def _lora_net(tasks: int = 2):
    from lorax_cil.models.backbones import create_backbone
    from lorax_cil.models.expandable import ExpandableNet
    from lorax_cil.models.lora import LoraSpec, lora_layers

    torch.manual_seed(0)
    bb = create_backbone("vit-test")
    plain = copy.deepcopy(bb)
    spec = LoraSpec(r=4, alpha=8.0, dropout=0.0, targets="attn")
    net = ExpandableNet(backbone=bb, extractor="lora", lora=spec)
    for t in range(tasks):
        net.add_task(2)
    with torch.no_grad():  # trained-looking adapters: B is zero at init
        for layer in lora_layers(net.backbone.model):
            for ad in layer.adapters:
                ad.lora_B.weight.normal_(0, 0.05)
        net.head.weight.normal_()
    return net, plain


def test_task_vectors_from_expandable_equal_hand_made_deltas_and_reproduce_the_adapter():
    from lorax_cil.models.lora import adapter_state_dict, lora_group

    net, plain = _lora_net()
    tvs = task_vectors_from_expandable(net, names=["gan", "diff"])
    base_state = plain.model.state_dict()
    d = net.feature_dim
    for t, tv in enumerate(tvs):
        sd = adapter_state_dict(net.backbone.model, t)
        want = sorted(k.replace(".lora_A.weight", ".weight") for k in sd if "lora_A" in k)
        assert sorted(tv.keys()) == want
        for key in tv.keys():
            layer = key[: -len(".weight")]
            hand = 2.0 * sd[f"{layer}.lora_B.weight"] @ sd[f"{layer}.lora_A.weight"]
            torch.testing.assert_close(tv[key], hand)
            assert key in base_state and base_state[key].shape == hand.shape
        torch.testing.assert_close(tv.head["weight"], net.head.weight[2 * t: 2 * t + 2, t * d:(t + 1) * d])
        torch.testing.assert_close(tv.head["bias"], net.head.bias[2 * t: 2 * t + 2])
        # theta_0 + Delta W in a plain backbone computes adapter t's feature
        merged = copy.deepcopy(plain)
        merged.model.load_state_dict(apply_task_vector(base_state, tv))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(t))
        with torch.no_grad(), lora_group(net.backbone.model, [t]):
            want = net.backbone(x)
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=1e-5)


def test_task_vectors_from_full_copies_reproduce_each_extractor():
    from lorax_cil.models.backbones import create_backbone
    from lorax_cil.models.expandable import ExpandableNet

    torch.manual_seed(0)
    bb = create_backbone("vit-test")
    plain = copy.deepcopy(bb)
    net = ExpandableNet(backbone=bb, extractor="full", adapt_blocks=1)
    for _ in range(2):
        net.add_task(2)
        with torch.no_grad():
            for p in net.extractors[-1].parameters():
                p.add_(0.05 * torch.randn_like(p))
    net.eval()
    tvs = task_vectors_from_expandable(net)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = net.forward_all(x).features
    d = net.feature_dim
    for t, tv in enumerate(tvs):
        assert tv.meta["kind"] == "lorax-full-copy"
        assert all(k.startswith(("blocks.3.", "norm.", "fc_norm.")) for k in tv)
        merged = copy.deepcopy(plain)
        merged.model.load_state_dict(apply_task_vector(plain.model.state_dict(), tv))
        with torch.no_grad():
            torch.testing.assert_close(merged(x), feats[:, t * d:(t + 1) * d], atol=1e-5, rtol=1e-5)


def test_dora_like_adapter_is_refused():
    from lorax_cil.models.lora import LoraAdapter, lora_layers

    class DoraLike(LoraAdapter):
        def __init__(self, base: LoraAdapter) -> None:
            super().__init__(lora_A=base.lora_A, lora_B=base.lora_B, dropout=0.0, scaling=base.scaling)
            self.magnitude = nn.Parameter(torch.ones(base.lora_B.weight.shape[0]))

    net, _ = _lora_net(1)
    layer = lora_layers(net.backbone.model)[0]
    layer.adapters[0] = DoraLike(layer.adapters[0])
    with pytest.raises(ValueError, match="DoRA"):
        task_vectors_from_expandable(net)
    net2, _ = _lora_net(1)
    lora_layers(net2.backbone.model)[1].adapters[0].scaling *= 2  # rsLoRA-style scaling the spec does not say
    with pytest.raises(ValueError, match="scaling"):
        task_vectors_from_expandable(net2)


def test_task_vectors_from_a_tiny_lorax_run(tmp_path):
    from conftest import make_cddb_tree
    from lorax_cil.benchmarks.scenarios import resolve_scenario
    from lorax_cil.merging import task_vectors_from_lorax_run
    from lorax_cil.training.checkpoint import load_checkpoint
    from lorax_cil.training.config import RunConfig, merge_config
    from lorax_cil.training.runner import Run, latest_checkpoint

    data = make_cddb_tree(tmp_path / "data", tasks=("a", "b"), n=2, size=(36, 36), subclass_tasks=())
    cfg = merge_config(RunConfig(), {
        "model": {"backbone": "vit-test", "pretrained": False, "lora_r": 4, "lora_alpha": 8,
                  "lora_dropout": 0.0},
        "data": {"scenario": "custom"},
        "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0, "memory_size": 2, "eval_batch_size": 8,
                  "min_steps_per_task": 0},
    }, source="test")
    run = Run(cfg, run_dir=tmp_path / "run")
    run.setup(resolve_scenario("custom", data_path=data, tasks=["a", "b"]))
    run.run_dir.mkdir(parents=True)
    run._write_static()
    for j in range(2):  # Run.train() without the final plots; the last step writes the checkpoint
        run._train_step(j)
    tvs = task_vectors_from_lorax_run(tmp_path / "run")
    assert [tv.name for tv in tvs] == ["a", "b"]
    tensors, meta = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for t, tv in enumerate(tvs):
        for key in tv.keys():
            layer = f"extractor.{t}.{key[: -len('.weight')]}"
            hand = 2.0 * tensors[f"{layer}.lora_B.weight"] @ tensors[f"{layer}.lora_A.weight"]
            torch.testing.assert_close(tv[key], hand)
        assert tv.head["weight"].shape == (2, 48) and tv.meta["task"] == t
    # a run whose recorded spec says rsLoRA cannot be merged with the alpha/r scaling it rebuilds
    folder = latest_checkpoint(tmp_path / "run")
    meta["architecture"]["lora"]["use_rslora"] = True
    meta["architecture"]["lora"]["scaling"] = 4.0
    from lorax_cil.training.checkpoint import _meta_digest

    meta["meta_sha256"] = _meta_digest(meta)  # resealed: a hand edit alone is refused
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="use_rslora=True"):
        task_vectors_from_lorax_run(tmp_path / "run")


def test_importing_the_package_is_cheap():
    code = "import sys, lorax_cil.merging; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
