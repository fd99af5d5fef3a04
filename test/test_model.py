"""X2P-Net units: shapes, the BrickFormer gather against a brute-force
reference, its cost against vanilla attention, gradients, unprojection for
non-square images, and overfitting a few cases."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from x2p_ros import geometry
from x2p_ros.geometry import carm_view
from x2p_ros.model import X2PNet, build_model, preset
from x2p_ros.model.brickformer import SCE, BrickLayer, brick_token_indices
from x2p_ros.model.encoder import flatten_background
from x2p_ros.model.fusion import Fusion3D, unproject, volume_frame, voxel_centres
from x2p_ros.model.prompt_fe import PromptFE
from x2p_ros.model.summary import example_inputs
from x2p_ros.model.vfe import VFE


def test_unit_output_shapes():
    torch.manual_seed(0)
    cfg = preset("tiny")
    images, P, prompt = example_inputs(cfg, batch=2)
    low, high = VFE(4, hires_stride=2)(images.flatten(0, 1))
    assert low.shape == (4, 32, 8, 8) and high.shape == (4, 8, 32, 32)
    f_m = PromptFE(32, 16, 2, 1, 8)(low, prompt.flatten(0, 1), (64, 64))
    assert f_m.shape == (4, 16, 8, 8)
    logits, emb, routing = SCE(16, 2, 1, 4, 4, 2, 2, "brick", 32)(f_m)
    assert logits.shape == (4, 4, 4, 4) and emb.shape == (4, 4, 16, 16) and routing.shape == (4, 1, 4, 16)
    out = X2PNet(cfg)(images, P, prompt)
    assert out["xyz"].shape == (2, 4, 3) and out["heatmaps"].shape == (2, 2, 4, 4, 4)
    assert out["presence"].shape == (2, 4) and out["pixels"].shape == (2, 2, 4, 2)
    assert out["volume_logits"].shape == (2, 4, 8, 6, 6) and out["volume_points"].shape == (2, 8, 6, 6, 3)
    assert out["routing"].shape == (2, 2, 1, 4, 16)  # (B, V, layers, N, 8 x 8 tokens / 2^2 per brick)


@pytest.mark.parametrize("name", ["no-prompt", "no-sce", "no-fusion", "vanilla", "sparse"])
def test_ablations_run(name):
    cfg = preset(name, **{k: v for k, v in preset("tiny").to_dict().items()
                          if k not in ("use_prompt", "use_sce", "use_fusion", "sce_attention", "volume_shape")},
                 volume_shape=(8, 6, 6))
    out = X2PNet(cfg)(*example_inputs(cfg))
    assert out["xyz"].shape == (1, 4, 3) and torch.isfinite(out["xyz"]).all()


def test_brick_indices_are_exactly_the_cells_under_each_brick():
    h = w = 12
    s = 3
    cells = torch.tensor([[0, 5, 15], [7, 3, 14]])
    got = brick_token_indices(cells, w, s)  # (2, 3, 9)
    for b in range(2):
        for j, cell in enumerate(cells[b].tolist()):
            brute = sorted(r * w + c for r in range(h) for c in range(w) if (r // s) * (w // s) + c // s == cell)
            assert sorted(got[b, j].tolist()) == brute


def test_brick_layer_matches_a_brute_force_reference():
    torch.manual_seed(1)
    d, heads, s, k, h, w, N, Q = 8, 2, 2, 3, 6, 8, 2, 4
    layer = BrickLayer(d, heads, s, k, "brick", 2 * d).eval()
    e = torch.randn(1, N, Q, d)
    f_m = torch.randn(1, d, h, w)
    pos = torch.randn(h * w, d)
    got, routing = layer(e, f_m, pos)
    # reference: loops over embeddings and heads, cells found by membership
    q = layer.norm_q(e[0])
    tokens = layer.norm_kv(f_m[0].flatten(1).T + pos)  # (hw, d)
    pooled = F.max_pool2d(f_m, s)[0].flatten(1).T + F.avg_pool2d(pos.T.reshape(1, d, h, w), s)[0].flatten(1).T
    bricks = layer.norm_kv(pooled)
    dh = d // heads
    want = []
    for n in range(N):
        q1, k1 = layer.q1(q[n]), layer.k1(bricks)
        attn1 = torch.stack([(q1[:, i * dh:(i + 1) * dh] @ k1[:, i * dh:(i + 1) * dh].T / dh ** 0.5).softmax(-1)
                             for i in range(heads)])  # (heads, Q, P)
        torch.testing.assert_close(routing[0, n], attn1.mean((0, 1)))
        top = attn1.mean((0, 1)).topk(k).indices.tolist()
        idx = [r * w + c for cell in top for r in range(h) for c in range(w)
               if (r // s) * (w // s) + c // s == cell]
        cell_of = {r * w + c: (r // s) * (w // s) + c // s for r in range(h) for c in range(w)}
        keys = tokens[idx]
        q2, k2, v2 = layer.q2(q[n]), layer.k2(keys), layer.v2(keys)
        outs = []
        for i in range(heads):
            sl = slice(i * dh, (i + 1) * dh)
            bias = torch.stack([attn1[i, :, cell_of[t]].log() for t in idx], dim=1)  # (Q, k s^2)
            a = (q2[:, sl] @ k2[:, sl].T / dh ** 0.5 + bias).softmax(-1)
            outs.append(a @ v2[:, sl])
        x = e[0, n] + layer.out(torch.cat(outs, dim=1))
        want.append(x + layer.ff(layer.norm_ff(x)))
    torch.testing.assert_close(got[0], torch.stack(want), atol=1e-5, rtol=1e-5)


def _sce_flops(mode, s, k, hw=32, d=16, N=4, S=4):
    sce = SCE(d, 2, 1, N, S, s, k, mode, 2 * d)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        sce(torch.randn(1, d, hw, hw))
    return counter.get_total_flops()


def test_brickformer_costs_less_than_vanilla_and_scales_as_the_paper_says():
    assert _sce_flops("brick", 4, 8) < 0.5 * _sce_flops("vanilla", 4, 8)
    # cost = c0 + c1 hw / s^2 + c2 k s^2: fit on three (s, k) and predict a fourth
    pts = [(2, 2), (2, 4), (4, 2)]
    A = np.array([[1.0, 32 * 32 / s ** 2, k * s ** 2] for s, k in pts])
    c = np.linalg.solve(A, [_sce_flops("brick", s, k) for s, k in pts])
    for s, k in [(4, 8), (8, 4)]:
        predicted = c @ [1.0, 32 * 32 / s ** 2, k * s ** 2]
        assert _sce_flops("brick", s, k) == pytest.approx(predicted, rel=0.01)
    assert c[1] > 0 and c[2] > 0


def test_the_paper_config_has_the_papers_sizes():
    from x2p_ros.model.summary import model_summary
    cfg = preset("paper")
    assert (cfg.image_size, cfg.sce_layers, cfg.heads, cfg.sce_ffn_dim, cfg.fe_layers) == (512, 4, 8, 512, 4)
    total = model_summary(cfg)["total"]
    assert total["params"] == pytest.approx(3.24e6, rel=0.05)  # paper: 3.24 M parameters
    assert total["gmacs"] == pytest.approx(130.8, rel=0.05)  # paper: 130.8 GMACs at 512 x 512


@pytest.mark.parametrize("heatmap_prior", [False, True])
def test_gradients_reach_every_parameter(heatmap_prior):
    torch.manual_seed(0)
    cfg = preset("tiny", heatmap_prior=heatmap_prior)
    model = X2PNet(cfg)
    images, P, prompt = example_inputs(cfg, batch=2)
    out = model(images, P, prompt)
    (out["xyz"].square().mean() + out["heatmaps"].square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def _views(W, H):
    Ps = []
    for view in ("ap", "lat"):
        P, _ = carm_view(view, 550.0, 1000.0, 150.0, W)
        # a non-square detector: keep the focal length, move the principal point to the new centre
        P = geometry.apply_pixel_transform(geometry.crop_transform(0, (W - H) / 2), P)
        Ps.append(P)
    return torch.tensor(np.stack(Ps))[None]  # (1, 2, 3, 4) float64


def test_unprojection_samples_each_voxel_at_its_projection_on_non_square_images():
    W, H, stride = 96, 64, 2
    P = _views(W, H)
    # features: the pixel coordinates of each feature cell's centre (a ramp: bilinear sampling is exact)
    u = geometry.cell_to_pixel(torch.arange(W // stride, dtype=torch.float64), W // stride, W)
    v = geometry.cell_to_pixel(torch.arange(H // stride, dtype=torch.float64), H // stride, H)
    ramp = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1])  # (2, h, w): channel 0 = u, 1 = v
    features = ramp[None, None].expand(1, 2, 2, H // stride, W // stride).contiguous()
    anchor = torch.tensor([[2.0, -3.0, 10.0]], dtype=torch.float64)
    axes, extents = volume_frame(P, (H, W), anchor, 0.5)
    points = voxel_centres(anchor, axes, extents, (6, 4, 4))
    sampled = unproject(features, P, points, (H, W))  # (1, 2, 2, 6, 4, 4)
    for k in range(2):
        uv, _ = geometry.project_torch(P[:, k], points.reshape(1, -1, 3))
        inner = ((uv[0, :, 0] > 1) & (uv[0, :, 0] < W - 2) & (uv[0, :, 1] > 1) & (uv[0, :, 1] < H - 2))
        got = sampled[0, k].reshape(2, -1).T
        assert inner.sum() > 20
        torch.testing.assert_close(got[inner], uv[0, inner], atol=1e-6, rtol=0)


def test_the_paper_volume_holds_a_short_lordotic_run():
    # issue 12: 2 % of the vertebrae lay outside the fusion volume in depth, mostly in short fields
    from x2p_ros.model.fusion import TOP_MARGIN
    P = torch.tensor(np.stack([carm_view(v, 550.0, 1000.0, 100.0, 512)[0] for v in ("ap", "lat")]))[None]
    prompted, lowest = torch.tensor([[0.0, 0.0, 40.0]], dtype=torch.float64), torch.tensor([0.0, 30.0, -40.0])
    for width, holds in ((0.5, False), (preset("paper").volume_width, True)):
        axes, extents = volume_frame(P, (512, 512), prompted, width)
        x, y, z = ((lowest - prompted[0]) @ axes[0]).tolist()
        inside = abs(x) <= extents[0, 0] / 2 and abs(y) <= extents[0, 1] / 2 and -(1 - TOP_MARGIN) * extents[0, 2] <= z
        assert inside == holds, (width, y, extents)


def test_unprojection_puts_a_known_points_feature_in_its_voxel():
    W, H = 96, 64
    P = _views(W, H)
    anchor = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    axes, extents = volume_frame(P, (H, W), anchor, 0.5)
    points = voxel_centres(anchor, axes, extents, (10, 8, 8))
    target = (4, 2, 5)
    X = points[0][target]
    # a sharp blob at the point's projection in each view
    feats = []
    for k in range(2):
        (pu, pv), = geometry.project_torch(P[:, k], X[None, None])[0][0].tolist()
        vv, uu = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")
        feats.append(torch.exp(-((uu - pu) ** 2 + (vv - pv) ** 2) / 2.0))
    volume = unproject(torch.stack(feats)[None, :, None], P, points, (H, W)).prod(1)[0, 0]  # both views agree
    assert np.unravel_index(int(volume.argmax()), volume.shape) == target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_heatmap_prior_puts_each_vertebra_where_its_own_heatmaps_meet(seed):
    # issue 12: unprojected among the other feature channels, the SCE heatmaps did not move the 3D estimates
    from x2p_ros.training.losses import gaussian_heatmaps
    W = H = 64
    P = _views(W, H).float()
    anchor = torch.tensor([[0.0, 0.0, 30.0]])
    torch.manual_seed(seed)
    features = torch.randn(1, 2, 6, 16, 16)
    points = voxel_centres(anchor, *volume_frame(P, (H, W), anchor, 0.5), (16, 12, 12))[0]  # (16, 12, 12, 3)
    rng = np.random.default_rng(seed)

    def estimates(fusion, xyz):  # each vertebra's heatmaps: Gaussians at its projections
        pixels = torch.stack([geometry.project_torch(P[:, k], xyz[None])[0][0] for k in range(2)])[None]
        maps = gaussian_heatmaps(pixels, torch.ones(1, 3), 16, (H, W), sigma_px=4.0)  # (1, 2, 3, 16, 16)
        return fusion(features, P, anchor, (H, W), maps)[1][0]

    for prior in (True, False):
        torch.manual_seed(seed)
        fusion = Fusion3D(6, 4, 3, (16, 12, 12), 0.5, heatmap_prior=prior).eval()
        for _ in range(2):  # three vertebrae in the middle of the volume, then elsewhere
            xyz = points[tuple(rng.integers([3, 3, 3], [13, 9, 9], size=(3, 3)).T)]  # (3, 3) mm
            step = (points[1, 1, 1] - points[0, 0, 0]).norm()  # a voxel's diagonal
            error = (estimates(fusion, xyz) - xyz).norm(dim=-1)
            if prior:
                assert error.max() < step, error
            else:  # what the fusion did without it: nothing brings it there
                assert error.max() > 2 * step, error


def test_the_routing_loss_teaches_each_embedding_the_brick_of_its_own_vertebra():
    # issue 12: learned through Attn2 alone, the routing picked the true vertebra's brick little more often
    # than chance; with its loss, each embedding's top-k holds its own vertebra's brick
    from x2p_ros.training.losses import routing_loss
    torch.manual_seed(0)
    d, h, s, k, N, size = 16, 8, 2, 2, 2, 64  # 4 x 4 bricks: chance 2 / 16
    sce = SCE(d, 2, 1, N, 2, s, k, "brick", 2 * d)
    markers = torch.randn(N, d) * 3  # what vertebra n looks like in f_m

    def sample(batch):  # each vertebra at a random token, the two never in one brick
        f_m = torch.randn(batch, d, h, h) * 0.5
        cells = torch.stack([torch.randperm((h // s) ** 2)[:N] for _ in range(batch)])  # (batch, N)
        rc = torch.stack([cells // (h // s), cells % (h // s)], -1) * s + torch.randint(0, s, (batch, N, 2))
        for b in range(batch):
            for n in range(N):
                f_m[b, :, rc[b, n, 0], rc[b, n, 1]] += markers[n]
        pixels = geometry.cell_to_pixel(rc.flip(-1).float(), h, size)  # token centres, (u, v) input pixels
        return f_m, cells, pixels[:, None]  # (batch, 1 view, N, 2)

    def hit_rate():
        with torch.no_grad():
            f_m, cells, _ = sample(200)
            routing = sce(f_m)[2][:, -1]  # (200, N, P)
            return (routing.topk(k, dim=-1).indices == cells[..., None]).any(-1).float().mean().item()

    before = hit_rate()
    optimizer = torch.optim.Adam(sce.parameters(), lr=3e-3)
    for _ in range(150):
        f_m, _, pixels = sample(16)
        loss = routing_loss(sce(f_m)[2][:, None], pixels, torch.ones(16, N), (size, size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before < 0.4 and hit_rate() > 0.9, (before, hit_rate())


def test_the_routing_loss_is_lowest_on_the_vertebras_brick():
    from x2p_ros.training.losses import gaussian_heatmaps, routing_loss
    pixels = torch.tensor([[[[20.0, 44.0]]]])  # (1, 1 view, 1 vertebra, 2): the brick at row 2, column 1 of 4 x 4
    present = torch.ones(1, 1)
    target = gaussian_heatmaps(pixels, present, 4, (64, 64), sigma_px=8.0).flatten(-2)
    on = (target / target.sum(-1, keepdim=True))[:, :, None]  # (1, 1, 1 layer, 1, 16)
    elsewhere = torch.full((1, 1, 1, 1, 16), 0.2 / 15)
    elsewhere[..., 3] = 0.8  # row 0, column 3
    uniform = torch.full((1, 1, 1, 1, 16), 1 / 16)
    losses = [routing_loss(r, pixels, present, (64, 64)).item() for r in (on, uniform, elsewhere)]
    assert losses == sorted(losses) and losses[1] - losses[0] > 1.0
    assert int(on.argmax()) == 2 * 4 + 1
    assert routing_loss(elsewhere, pixels, torch.zeros(1, 1), (64, 64)).item() == 0.0  # absent: no loss


PAPER_OBJECTIVE = dict(heatmap_prior=True, loss_3d_peak_sigma_mm=6.0, loss_routing_weight=0.1)


@pytest.mark.parametrize("objective", [{}, PAPER_OBJECTIVE], ids=["cpu", "paper"])
def test_training_a_few_cases_drives_their_3d_error_below_2mm(tmp_path, objective):
    from x2p_ros.data import case_io
    from x2p_ros.data.synth import SynthConfig, synthesize
    from x2p_ros.training.data import BiplanarDataset
    from x2p_ros.training.losses import x2p_losses

    synthesize(tmp_path, 3, seed=2, config=SynthConfig(size=128), workers=1, progress=False)  # fields of 4-8 vertebrae
    torch.manual_seed(0)
    cfg = preset("tiny", **objective)
    ds = BiplanarDataset(tmp_path, case_io.list_cases(tmp_path), cfg.image_size, cfg.n_vertebrae)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("images", "P", "prompt", "xyz",
                                                                         "present", "pixels")}
    model = X2PNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps = 300
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        out = model(batch["images"], batch["P"], batch["prompt"])
        loss = x2p_losses(out, batch, cfg)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        out = model(batch["images"], batch["P"], batch["prompt"])
    err = (out["xyz"] - batch["xyz"]).norm(dim=-1)[batch["present"]]
    assert err.mean() < 2.0, f"3D error after training: {err.mean():.2f} mm"


def test_lifting_baseline_triangulates_its_2d_points():
    torch.manual_seed(0)
    cfg = preset("tiny", lifting=True)
    model = build_model(cfg)
    images, P, prompt = example_inputs(cfg, batch=2)
    out = model(images, P, prompt)
    assert out["heatmaps"].shape == (2, 2, 4, 32, 32) and out["xyz"].shape == (2, 4, 3)
    assert not hasattr(model, "sce") and not hasattr(model, "fusion")  # no SCE, no 3D fusion
    # the 3D points are the triangulation of the 2D points it reports
    uv, _ = geometry.project_torch(P.double(), out["xyz"].double()[:, None].expand(-1, 2, -1, -1))
    rays_meet = geometry.triangulate_torch(P.double(), uv)
    torch.testing.assert_close(rays_meet, out["xyz"].double(), atol=1e-3, rtol=0)
    out["xyz"].sum().backward()
    assert model.vfe.down[0][0].weight.grad is not None


def test_soft_argmax_2d_finds_a_peak_at_its_pixel_on_non_square_maps():
    from x2p_ros.model.heatmaps import soft_argmax_2d
    logits = torch.full((1, 16, 24), -50.0)
    logits[0, 5, 17] = 50.0  # map cell (row 5, col 17) of a 48 x 32 image at stride 2
    uv = soft_argmax_2d(logits, (32, 48))[0]
    torch.testing.assert_close(uv, torch.tensor([17 * 2 + 0.5, 5 * 2 + 0.5]))


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_heatmap_peaks_are_exact_on_gaussian_maps_of_any_width(sigma):
    from x2p_ros.model.heatmaps import heatmap_peaks
    S = 16
    torch.manual_seed(0)
    centre = torch.rand(200, 2) * (S - 3) + 1.5  # (col, row) in cells, anywhere between cells
    cells = torch.arange(S, dtype=torch.float32)
    maps = torch.exp(-((cells[None, None, :] - centre[:, 0, None, None]) ** 2
                       + (cells[None, :, None] - centre[:, 1, None, None]) ** 2) / (2 * sigma ** 2))
    truth = torch.stack([geometry.cell_to_pixel(centre[:, 0], S, 512), geometry.cell_to_pixel(centre[:, 1], S, 512)],
                        dim=-1)
    assert (heatmap_peaks(maps, (512, 512)) - truth).norm(dim=-1).max() < 0.01  # px of a 512 px image
    edge = torch.zeros(1, S, S)
    edge[0, 0, 0], edge[0, 0, 1] = 1.0, 0.5  # a peak in the corner: no neighbour beyond it, no sub-cell shift
    torch.testing.assert_close(heatmap_peaks(edge, (512, 512)), torch.tensor([[15.5, 15.5]]))


def test_build_model_gives_each_method_over_the_same_encoder():
    from x2p_ros.model import LiftingBaseline
    from x2p_ros.model.encoder import BiplanarEncoder
    x2p, lifting = build_model(preset("tiny")), build_model(preset("tiny", lifting=True))
    assert type(x2p) is X2PNet and type(lifting) is LiftingBaseline
    assert isinstance(x2p, BiplanarEncoder) and isinstance(lifting, BiplanarEncoder)
    shared = {k for k in x2p.state_dict() if k.startswith(("vfe.", "fe."))}
    assert shared and shared == {k for k in lifting.state_dict() if k.startswith(("vfe.", "fe."))}
    with pytest.raises(ValueError, match="build_model"):
        X2PNet(preset("tiny", lifting=True))


def test_cell_centred_position_codes_agree_across_grids_and_do_not_alias():
    """Issue 12: the doubling frequencies on 0..1 (the shipped cpu models) give the same point
    different codes on the 16 x 16 embedding grid and on a token grid, and alias (a cell farther
    away can look nearer); the cell-centred codes below Nyquist (the paper config) do neither."""
    from x2p_ros.model.position_encoding import sine_positions

    def codes(cells, max_cycles):
        return sine_positions(cells, cells, 64, max_cycles=max_cycles).reshape(cells, cells, 64)

    for max_cycles, same_point, aliasing in ((0.0, False, True), (4.0, True, False)):
        coarse, fine = codes(16, max_cycles), codes(48, max_cycles)
        # cell (i, j) of 16 and cell (3i + 1, 3j + 1) of 48 share their centre
        agree = F.cosine_similarity(coarse[5, 7], fine[16, 22], dim=0).item()
        assert (agree > 0.999) is same_point, (max_cycles, agree)
        along_row = [F.cosine_similarity(coarse[8, 0], coarse[8, k], dim=0).item() for k in range(8)]
        rises = max(b - a for a, b in zip(along_row, along_row[1:]))
        assert (rises > 0.05) is aliasing, (max_cycles, along_row)
    assert preset("paper").position_max_cycles == 4.0 and preset("cpu").position_max_cycles == 0.0
    with pytest.raises(ValueError, match="Nyquist"):
        preset("cpu", position_max_cycles=9.0)


def test_config_overrides_are_read_as_each_fields_type_and_bad_ones_refused():
    from x2p_ros.model.config import parse_overrides
    got = parse_overrides(["heatmap_prior=TRUE", "loss_3d_peak_sigma_mm=6", "top_k = 4", "volume_shape=8,6,6",
                           "sce_attention=vanilla"])
    assert got == {"heatmap_prior": True, "loss_3d_peak_sigma_mm": 6.0, "top_k": 4, "volume_shape": (8, 6, 6),
                   "sce_attention": "vanilla"}
    assert type(got["loss_3d_peak_sigma_mm"]) is float and type(got["top_k"]) is int
    assert preset("tiny", **got).volume_shape == (8, 6, 6)
    for bad, says in (("heatmap_prior=1", "true or false"), ("top_k=2.5", "not a valid top_k"),
                      ("volume_shape=8,6", "3 integers"),
                      ("volume_width=nan", "not a finite number"), ("no_such_field=1", "FIELD=VALUE"),
                      ("heatmap_prior", "FIELD=VALUE")):
        with pytest.raises(ValueError, match=says):
            parse_overrides([bad])


def _spine_like(size=64, seed=0):
    """(1, 1, size, size): a column of bright blocks (vertebrae) with noise on a dark background."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.02, (size, size))
    for top in range(4, size - 8, 12):
        x[top:top + 8, size // 2 - 6:size // 2 + 6] += 0.5
    return torch.tensor(x, dtype=torch.float32)[None, None]


def test_background_flattening_removes_the_bodys_gradient_and_exposure_and_keeps_the_spine():
    spine = _spine_like()
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    thick = 3.0 * spine + 0.7 + 0.05 * rows - 0.03 * cols  # more contrast, a brighter exposure, a tilted body
    sigma = 0.125 * 64
    flat, flat_thick = flatten_background(spine, sigma), flatten_background(thick, sigma)
    # a linear ramp is not blurred to itself near the replicated edges, which also moves the median (the scale)
    inner = (slice(None), slice(None), slice(16, 48), slice(16, 48))
    agreement = torch.corrcoef(torch.stack([flat[inner].flatten(), flat_thick[inner].flatten()]))[0, 1]
    before = torch.corrcoef(torch.stack([spine[inner].flatten(), thick[inner].flatten()]))[0, 1]
    assert agreement > 0.999 > before + 0.05
    assert flat.shape == spine.shape and float(flat.abs().max()) <= 1.5
    assert float(flat.abs().median()) == pytest.approx(0.25, rel=0.05)  # the scale the docstring promises
    assert float(flat[0, 0, 8, 32]) > 0.5 > float(flat[0, 0, 8, 10])  # a block stays brighter than beside it
    assert float(flat[0, 0, 14, 32]) < float(flat[0, 0, 8, 32])  # and than the gap below it
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the node's bf16 runs it: the same, in float32
        torch.testing.assert_close(flatten_background(thick, sigma), flat_thick)


def test_background_flattening_is_part_of_the_model_only_when_configured():
    torch.manual_seed(0)
    images, P, prompt = example_inputs(preset("tiny"), batch=1)
    ramp = torch.linspace(0, 2, 64).view(1, 1, 1, 1, 64)
    shifted = images * 3 + 1 + 0 * ramp  # contrast and exposure only: flattening undoes them exactly
    plain = X2PNet(preset("tiny")).eval()
    flattening = X2PNet(preset("tiny", background_sigma=0.125)).eval()
    flattening.load_state_dict(plain.state_dict())  # the same weights: the option adds none
    with torch.no_grad():
        assert torch.allclose(flattening(images, P, prompt)["xyz"], flattening(shifted, P, prompt)["xyz"], atol=1e-4)
        assert not torch.allclose(plain(images, P, prompt)["xyz"], plain(shifted, P, prompt)["xyz"], atol=1e-2)
    with pytest.raises(ValueError, match="background_sigma"):
        preset("cpu", background_sigma=0.8)
