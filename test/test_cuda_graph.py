"""The Localizer's CUDA-graph forward (x2p_ros/cuda_graph.py) gives what the eager
forward gives, pair after pair (needs a GPU: skipped without one, as in CI; run
on the lent GPU machine, issue 12). On the CPU: the forward computes with no
tensor made from host data, which a capture cannot hold."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from x2p_ros import geometry
from x2p_ros.inference import Localizer
from x2p_ros.model import build_model, preset
from x2p_ros.model.summary import example_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


class FromHostData(TorchDispatchMode):
    """Records the ops that take a tensor neither given to the forward nor made by an op inside it: one
    made from host data (a list, a NumPy array), which on a GPU is a copy from the host that ends a capture
    (found on an H200: the `paper` config's position codes were made with NumPy)."""

    def __init__(self, given):
        super().__init__()
        self.known = list(given)  # held, so that the ids stay unique
        self.ids = {id(t) for t in self.known}
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):  # 0-d tensors are scalars: a kernel takes them as arguments
            if isinstance(t, torch.Tensor) and t.dim() > 0 and id(t) not in self.ids:
                self.found.append(str(func))
        out = func(*args, **kwargs)
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.known += made
        self.ids.update(id(t) for t in made)
        return out


@pytest.mark.parametrize("name", ["tiny", "cpu", "cpu-baseline", "paper", "baseline", "no-sce", "sparse"])
def test_the_forward_uses_no_tensor_made_from_host_data(name):
    small = {} if name in ("tiny", "cpu", "cpu-baseline") else {"image_size": 128, "prompt_radius": 12}
    model = build_model(preset(name, **small)).eval()
    inputs = example_inputs(model.config)
    with torch.no_grad(), FromHostData([*inputs, *model.parameters(), *model.buffers()]) as mode:
        model(*inputs)
    assert mode.found == []


@needs_cuda
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
        assert graphed.runs_as_graph, "the forward was not captured"
        for key in ("xyz", "presence"):
            tol = 2e-2 if bf16 else 1e-3  # mm and presence: the same kernels, replayed
            assert torch.allclose(got[key].float(), want[key].float(), atol=tol), (key, step)


def test_warm_up_changes_no_result_and_on_the_cpu_captures_nothing():
    torch.manual_seed(2)
    model = build_model(preset("tiny")).eval()
    images, P, prompt = example_inputs(model.config)
    cold = Localizer(model, "cpu").forward(images, P, prompt)
    warm = Localizer(model, "cpu")
    warm.warm_up()
    assert not warm.runs_as_graph
    assert torch.equal(warm.forward(images, P, prompt)["xyz"], cold["xyz"])


@needs_cuda
def test_warm_up_captures_the_graph_on_cuda():
    localizer = Localizer(build_model(preset("tiny")).eval(), "cuda")
    localizer.warm_up()
    assert localizer.runs_as_graph


@needs_cuda
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
    assert on_gpu.runs_as_graph
    np.testing.assert_allclose([v.xyz_mm for v in found], [v.xyz_mm for v in on_cpu], atol=1e-2)
