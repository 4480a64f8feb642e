"""Each algorithm against its closed form, on tiny tensors (float64 references)."""

import math

import pytest
import torch
from factories import rel_err

from lib_lorakit.networks import ALGORITHMS, ShapeProblem, check_group, compute_delta, identify
from lib_lorakit.networks.oft import cayley

G = torch.Generator().manual_seed(0)


def r(*s):
    return torch.randn(s, generator=G, dtype=torch.float64)


def run(p, target, weight=None):
    names = frozenset(p)
    alg, extra = identify(names)
    assert alg is not None and not extra, (names, extra)
    shapes = {k: tuple(v.shape) for k, v in p.items()}
    check_group(alg, shapes, target)
    p32 = {k: v.float() if v.is_floating_point() else v for k, v in p.items()}
    d = compute_delta(alg, p32, target, None if weight is None else weight.float())
    return alg, d.to_dense(target).double(), d


def test_registry_order_is_explicit():
    assert [a.id for a in ALGORITHMS] == ["oft", "lokr", "loha", "glora", "full", "norm", "ia3", "lora"]


def test_lora_linear():
    up, down = r(6, 2), r(2, 5)
    alg, d, raw = run({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}, (6, 5))
    assert alg.id == "lora" and raw.lowrank is not None  # kept factored
    assert rel_err(d, 0.5 * up @ down) < 1e-6


def test_lora_alpha_absent_means_scale_one_and_scale_key_overrides():
    up, down = r(6, 3), r(3, 5)
    _, d, _ = run({"lora_up.weight": up, "lora_down.weight": down}, (6, 5))
    assert rel_err(d, up @ down) < 1e-6
    _, d, _ = run(
        {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3.0), "scale": torch.tensor(0.25)},
        (6, 5),
    )
    assert rel_err(d, 0.25 * up @ down) < 1e-6


def test_lora_conv1x1_and_linear_interchangeable():
    up, down = r(6, 2, 1, 1), r(2, 5, 1, 1)
    _, d, _ = run({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}, (6, 5, 1, 1))
    assert rel_err(d, (up[:, :, 0, 0] @ down[:, :, 0, 0]).reshape(6, 5, 1, 1)) < 1e-6
    # a linear-shaped LoRA on a 1x1 conv weight (SD2-style proj_in files) fits too
    _, d2, _ = run({"lora_up.weight": up[:, :, 0, 0], "lora_down.weight": down[:, :, 0, 0]}, (6, 5, 1, 1))
    assert d2.shape == (6, 5, 1, 1)


def test_locon_conv3x3_matches_conv_composition():
    up, down = r(6, 2, 1, 1), r(2, 4, 3, 3)
    _, d, _ = run({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}, (6, 4, 3, 3))
    # independent: the update is conv(x, down) then conv(., up); compare on an input
    x = r(1, 4, 7, 7)
    y_ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    y = torch.nn.functional.conv2d(x, d, padding=1)
    assert rel_err(y, y_ref) < 1e-5


def test_locon_tucker_mid():
    up, down, mid = r(6, 2, 1, 1), r(2, 4, 1, 1), r(2, 2, 3, 3)
    _, d, _ = run(
        {"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid, "alpha": torch.tensor(2.0)},
        (6, 4, 3, 3),
    )
    x = r(1, 4, 6, 6)
    y_ref = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up
    )
    assert rel_err(torch.nn.functional.conv2d(x, d, padding=1), y_ref) < 1e-5


def test_loha_and_tucker():
    w1a, w1b, w2a, w2b = r(6, 2), r(2, 5), r(6, 2), r(2, 5)
    _, d, _ = run(
        {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.0)}, (6, 5)
    )
    assert rel_err(d, 0.5 * (w1a @ w1b) * (w2a @ w2b)) < 1e-6
    # Tucker: hada_w*_a is (rank, out), hada_w*_b (rank, in), t (rank, rank, k, k)
    a1, b1, t1, a2, b2, t2 = r(2, 6), r(2, 4), r(2, 2, 3, 3), r(2, 6), r(2, 4), r(2, 2, 3, 3)
    _, d, _ = run(
        {
            "hada_w1_a": a1,
            "hada_w1_b": b1,
            "hada_t1": t1,
            "hada_w2_a": a2,
            "hada_w2_b": b2,
            "hada_t2": t2,
            "alpha": torch.tensor(2.0),
        },
        (6, 4, 3, 3),
    )
    f1 = torch.zeros(6, 4, 3, 3, dtype=torch.float64)
    f2 = torch.zeros_like(f1)
    for i in range(2):
        for j in range(2):
            f1 += t1[i, j][None, None] * torch.outer(a1[i], b1[j])[:, :, None, None]
            f2 += t2[i, j][None, None] * torch.outer(a2[i], b2[j])[:, :, None, None]
    assert rel_err(d, f1 * f2) < 1e-5


@pytest.mark.parametrize(
    "w1_full,w2_mode",
    [(True, "full"), (True, "lr"), (False, "full"), (False, "lr"), (True, "tucker"), (False, "tucker")],
)
def test_lokr_every_combination(w1_full, w2_mode):
    conv = w2_mode == "tucker"
    target = (6, 10, 3, 3) if conv else (6, 10)
    p = {}
    if w1_full:
        w1 = r(2, 2)
        p["lokr_w1"] = w1
    else:
        a, b = r(2, 1), r(1, 2)
        p["lokr_w1_a"], p["lokr_w1_b"] = a, b
        w1 = a @ b
    if w2_mode == "full":
        w2 = r(3, 5)
        p["lokr_w2"] = w2
    elif w2_mode == "lr":
        a, b = r(3, 2), r(2, 5)
        p["lokr_w2_a"], p["lokr_w2_b"] = a, b
        w2 = a @ b
    else:
        a, b, t = r(2, 3), r(2, 5), r(2, 2, 3, 3)  # lokr_w2_a (rank, out), lokr_w2_b (rank, in)
        p["lokr_w2_a"], p["lokr_w2_b"], p["lokr_t2"] = a, b, t
        w2 = torch.einsum("ijkl,ip,jq->pqkl", t, a, b)
    p["alpha"] = torch.tensor(4.0)
    _, d, _ = run(p, target)
    rank = p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else (p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None)
    scale = 4.0 / rank if rank else 1.0  # both sides full: scale 1
    if conv:
        expected = torch.einsum("ab,cdkl->acbdkl", w1, w2).reshape(target)
    else:
        expected = torch.kron(w1, w2)
    assert rel_err(d, scale * expected) < 1e-6


def test_lokr_conv_with_flattened_kernel():
    w1, a, b = r(2, 2), r(3, 2), r(2, 5 * 9)  # lokr_w2_b holds (rank, in*k*k) as LyCORIS modules store it
    _, d, _ = run({"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "alpha": torch.tensor(2.0)}, (6, 10, 3, 3))
    w2 = (a @ b).reshape(3, 5, 3, 3)
    assert rel_err(d, torch.einsum("ab,cdkl->acbdkl", w1, w2).reshape(6, 10, 3, 3)) < 1e-6


def test_full_and_norm_with_biases():
    diff, db = r(6, 5), r(6)
    alg, d, raw = run({"diff": diff, "diff_b": db}, (6, 5))
    assert alg.id == "full" and rel_err(d, diff) < 1e-7 and rel_err(raw.bias.double(), db) < 1e-7
    wn, bn = r(8), r(8)
    alg, d, raw = run({"w_norm": wn, "b_norm": bn}, (8,))
    assert alg.id == "norm" and rel_err(d, wn) < 1e-7 and rel_err(raw.bias.double(), bn) < 1e-7


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(on_input):
    w = r(6, 5)
    v = r(5) if on_input else r(6)
    _, d, _ = run({"weight": v, "on_input": torch.tensor(on_input)}, (6, 5), weight=w)
    expected = w * v[None, :] if on_input else w * v[:, None]
    assert rel_err(d, expected) < 1e-6


def test_glora_both_layouts():
    w = r(6, 5)
    a1, a2, b1, b2 = r(5, 2), r(2, 5), r(6, 2), r(2, 5)  # LyCORIS: a1 (in,r) a2 (r,in) b1 (out,r) b2 (r,in)
    _, d, _ = run(
        {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(1.0)},
        (6, 5),
        weight=w,
    )
    assert rel_err(d, 0.5 * (w @ a1 @ a2 + b1 @ b2)) < 1e-6
    # older layout read by the WebUI: a1 (r,in) a2 (in,r) b1 (r,in) b2 (out,r); ΔW = W a2 a1 + b2 b1
    o1, o2, p1, p2 = r(2, 5), r(5, 2), r(2, 5), r(6, 2)
    _, d, _ = run(
        {"a1.weight": o1, "a2.weight": o2, "b1.weight": p1, "b2.weight": p2, "alpha": torch.tensor(2.0)},
        (6, 5),
        weight=w,
    )
    assert rel_err(d, w @ o2 @ o1 + p2 @ p1) < 1e-6


def _cayley_ref(q, constraint):
    q = q - q.transpose(-1, -2)
    n = q.norm()
    if constraint > 0 and n > constraint:
        q = q * constraint / n
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def test_oft_kohya_style_is_orthogonal_rotation_of_outputs():
    w, blocks = r(6, 5), r(3, 2, 2) * 0.1
    _, d, _ = run({"oft_blocks": blocks, "alpha": torch.tensor(1e-3)}, (6, 5), weight=w)
    R = torch.block_diag(*_cayley_ref(blocks, 1e-3 * 6))
    assert rel_err(d + w, R.T @ w) < 1e-5  # kohya: y' = y @ R, i.e. W' = R^T W
    assert torch.allclose(R @ R.T, torch.eye(6, dtype=R.dtype), atol=1e-6)


def test_oft_lycoris_rescale_and_legacy_diag():
    w, blocks, rescale = r(6, 3, 3, 3), r(2, 3, 3) * 0.1, r(6, 1, 1, 1)
    _, d, _ = run({"oft_blocks": blocks, "rescale": rescale, "alpha": torch.tensor(0.0)}, (6, 3, 3, 3), weight=w)
    R = torch.block_diag(*_cayley_ref(blocks, 0))
    rot = (R.T @ w.reshape(6, -1)).reshape(w.shape)
    assert rel_err(d, rescale * rot - w) < 1e-5
    legacy = torch.stack([torch.linalg.qr(r(3, 3))[0] for _ in range(2)])  # stores R itself
    _, d, _ = run({"oft_diag": legacy}, (6, 5), weight=w.reshape(6, -1)[:, :5].contiguous())
    ww = w.reshape(6, -1)[:, :5]
    assert rel_err(d + ww, torch.block_diag(*legacy).T @ ww) < 1e-5


def test_boft_against_lycoris():
    lycoris_boft = pytest.importorskip("lycoris.functional.boft")
    w, blocks = r(8, 5).float(), (r(2, 2, 4, 4) * 0.1).float()  # m=2 stages, 2 blocks of 4
    _, d, _ = run({"oft_blocks": blocks.double(), "alpha": torch.tensor(0.0)}, (8, 5), weight=w.double())
    ref = lycoris_boft._diff_weight(w, blocks, None, 0, 1)
    assert rel_err(d, ref) < 1e-5


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_both_axes(axis):
    w, up, down = r(6, 5), r(6, 2), r(2, 5)
    m = (r(6, 1).abs() + 0.5) if axis == "out" else (r(1, 5).abs() + 0.5)
    alg, d, _ = run(
        {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": m}, (6, 5), weight=w
    )
    v = w + 0.5 * up @ down
    norm = v.norm(dim=1, keepdim=True) if axis == "out" else v.norm(dim=0, keepdim=True)
    assert rel_err(d, m * v / norm - w) < 1e-6


def test_peft_magnitude_vector_is_dora_on_outputs():
    w, up, down, mag = r(6, 5), r(6, 2), r(2, 5), r(6).abs() + 0.5
    _, d, _ = run({"lora_up.weight": up, "lora_down.weight": down, "lora_magnitude_vector": mag}, (6, 5), weight=w)
    v = w + up @ down
    assert rel_err(d, mag[:, None] * v / v.norm(dim=1, keepdim=True) - w) < 1e-6


def test_shape_problems_are_reported():
    with pytest.raises(ShapeProblem, match="gives"):
        run({"lora_up.weight": r(6, 2), "lora_down.weight": r(2, 5)}, (7, 5))
    with pytest.raises(ShapeProblem, match="disagree on the rank"):
        run({"lora_up.weight": r(6, 3), "lora_down.weight": r(2, 5)}, (6, 5))
    with pytest.raises(ShapeProblem, match="kron"):
        run({"lokr_w1": r(2, 2), "lokr_w2": r(3, 5)}, (6, 11))
    with pytest.raises(ShapeProblem, match="dora_scale"):
        run({"lora_up.weight": r(6, 2), "lora_down.weight": r(2, 5), "dora_scale": r(3, 1)}, (6, 5), weight=r(6, 5))


def test_unknown_parameters_are_not_silently_owned():
    alg, extra = identify(frozenset({"lora_up.weight", "lora_down.weight", "mystery"}))
    assert alg.id == "lora" and extra == ["mystery"]
    alg, extra = identify(frozenset({"something_else"}))
    assert alg is None and extra == ["something_else"]


def test_lowrank_norm_without_materialising():
    up, down = r(40, 3).float(), r(3, 30).float()
    from lib_lorakit.networks.base import Delta

    assert math.isclose(Delta(lowrank=(up, down)).norm(), float((up @ down).norm()), rel_tol=1e-5)


def test_cayley_is_orthogonal():
    R = cayley(torch.randn(3, 4, 4, generator=G), 0)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(4).expand(3, 4, 4), atol=1e-5)
