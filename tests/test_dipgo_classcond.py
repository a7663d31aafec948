"""DiP-GO on a class-conditional UNet2DModel: labels through the graph, an all-compute step equal to the
model, skipped blocks cheaper, and each image's own label in its backups."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffprune.metrics.cost import MacCounter
from diffprune.pruning.dipgo import GatedRunner, UNet2DGraph, block_costs, block_graph


def _unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=10).eval()


def test_labels_pass_through_the_graph_and_a_full_step_equals_the_model():
    unet = _unet()
    graph = block_graph(unet)
    assert isinstance(graph, UNet2DGraph) and graph.block_names == ["down_0", "down_1", "mid", "up_0", "up_1"]
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 7])
    with torch.no_grad(), graph.conditioned(y):
        out = graph.forward(x, t, lambda k, compute: compute())
        runner = GatedRunner(graph)
        full = runner.step_hard(x, t, [True] * 5)
    ref = unet(x, t, class_labels=y).sample
    assert torch.equal(out, ref) and torch.equal(full, ref)
    assert not torch.equal(ref, unet(x, t, class_labels=torch.tensor([3, 8])).sample)  # labels matter


def test_a_reused_block_costs_less_and_keeps_each_rows_label():
    unet = _unet()
    graph, runner = UNet2DGraph(unet), None
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([900, 900])
    y = torch.tensor([3, 7])
    with torch.no_grad(), graph.conditioned(y):
        runner = GatedRunner(graph)
        runner.step_hard(x, t, [True] * 5)
        with MacCounter(unet) as c:
            skipped = runner.step_hard(x * 0.9, t - 300, [True, True, False, True, True])
    costs = block_costs(graph, (1, 8, 8))  # no labels: class 0, the same cost
    assert c.total < 2 * costs.full
    with torch.no_grad(), graph.conditioned(y[1:]):  # row 1 alone: the same result as in the batch
        alone = GatedRunner(graph)
        alone.step_hard(x[1:], t[1:], [True] * 5)
        one = alone.step_hard(x[1:] * 0.9, t[1:] - 300, [True, True, False, True, True])
    assert torch.allclose(one, skipped[1:], atol=1e-5)
