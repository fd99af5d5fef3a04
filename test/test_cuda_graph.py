"""The Localizer's CUDA-graph forward (x2p_ros/cuda_graph.py) gives what the eager
forward gives, pair after pair. Needs a GPU: skipped without one (CI); run on
the lent GPU machine (issue 12)."""
import numpy as np
import pytest
import torch

from x2p_ros import geometry
from x2p_ros.inference import Localizer
from x2p_ros.model import build_model, preset
from x2p_ros.model.summary import example_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.mark.parametrize("name", ["tiny", "paper", "baseline"])
@pytest.mark.parametrize("bf16", [False, True])
def test_graphed_forward_matches_eager_on_new_inputs(name, bf16):
    torch.manual_seed(0)
    model = build_model(preset(name)).cuda().eval()
    images, P, prompt = (t.cuda() for t in example_inputs(model.config))
    graphed = Localizer(model, "cuda", bf16=bf16)
    eager = Localizer(model, "cuda", bf16=bf16, cuda_graph=False)
    for step in range(3):  # the first call captures; the later ones replay on other images and prompts
        shown = images + 0.3 * step * torch.randn_like(images)
        moved = prompt + 7.0 * step
        got, want = graphed.forward(shown, P, moved), eager.forward(shown, P, moved)
        assert graphed._graphed is not None, "the forward was not captured"
        for key in ("xyz", "presence"):
            tol = 2e-2 if bf16 else 1e-3  # mm and presence: the same kernels, replayed
            assert torch.allclose(got[key].float(), want[key].float(), atol=tol), (key, step)


def test_localize_on_cuda_with_a_graph_gives_the_cpu_result():
    torch.manual_seed(1)
    model = build_model(preset("tiny")).eval()
    images, P, prompt = example_inputs(model.config)
    views = geometry.VIEWS
    inputs = ({v: images[0, k, 0].numpy() for k, v in enumerate(views)},
              {v: P[0, k].double().numpy() for k, v in enumerate(views)},
              {v: prompt[0, k].numpy() for k, v in enumerate(views)})
    on_cpu = Localizer(model, "cpu").localize(*inputs)
    on_gpu = Localizer(model, "cuda")  # the same weights, moved
    found = on_gpu.localize(*inputs)
    assert on_gpu._graphed is not None
    np.testing.assert_allclose([v.xyz_mm for v in found], [v.xyz_mm for v in on_cpu], atol=1e-2)
