"""K-FAC blocks: one block per parameter (tied weights), uses outside a block refused, a conv's patches."""

import copy

import pytest
import torch as th
from torch import nn
from torch.nn import functional as F

from sb3_trpo_kfac.common.kfac import KFAC, Conv2dBlock, LinearBlock

from .conftest import applied_step, dense_step, factors, location_oracle, regression_step, sample_loss


def _tied_pair(tie_bias: bool) -> nn.Sequential:
    th.manual_seed(0)
    encoder, decoder = nn.Linear(3, 3), nn.Linear(3, 3)
    decoder.weight = encoder.weight
    if tie_bias:
        decoder.bias = encoder.bias
    return nn.Sequential(encoder, nn.Tanh(), decoder).double()


def test_blocks_are_typed_by_layer_kind():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1), nn.Linear(1, 1, bias=False))
    blocks = KFAC(model).blocks
    assert [type(block) for block in blocks] == [Conv2dBlock, LinearBlock, LinearBlock]
    assert [block.matrix_shape for block in blocks] == [(2, 10), (1, 3), (1, 1)]
    mat = th.arange(20.0).view(2, 10)
    weight, bias = blocks[0].from_matrix(mat)
    assert weight.shape == (2, 1, 3, 3) and weight.data_ptr() == mat.data_ptr() and th.equal(bias, mat[:, -1])
    assert blocks[2].from_matrix(th.ones(1, 1))[1] is None


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [(2, 1), "valid"])
def test_conv_patches_reproduce_the_convolution(padding_mode, padding):
    th.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(1, 2), dilation=(2, 1), padding=padding, padding_mode=padding_mode).double()
    x = th.randn(2, 2, 7, 8, dtype=th.float64)
    rows = Conv2dBlock.patches(conv, x)
    out = conv(x)
    # one row per sample and output position, in the column order of weight.view(out, -1)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 3)
    th.testing.assert_close(rows @ conv.weight.view(3, -1).T + conv.bias, expected)


def test_tied_weight_and_bias_are_one_block_fed_by_both_uses():
    model = _tied_pair(tie_bias=True)
    layer = model[0]
    lr, damping = 0.5, 0.05
    opt = KFAC(model, lr=lr, momentum=0.0, kfac_clip=1e9, kfac_damping=damping)
    assert [block.name for block in opt.blocks] == ["0, 2"]
    assert opt.blocks[0].modules == [model[0], model[2]]
    n = 6
    gen = th.Generator().manual_seed(0)
    x, target = th.randn(n, 3, dtype=th.float64, generator=gen), th.randn(n, 3, dtype=th.float64, generator=gen)
    with opt.collect():
        out = model(x)
    opt.update_statistics(sample_loss(out, target))

    inputs, deltas = [], []
    for i in range(n):  # the two uses are two locations of each sample
        pre1 = layer(x[i : i + 1])
        hidden = th.tanh(pre1)
        pre2 = layer(hidden)
        d1, d2 = th.autograd.grad(sample_loss(pre2, target[i : i + 1]), [pre1, pre2])
        inputs.append(th.cat([x[i : i + 1], hidden.detach()]))
        deltas.append(th.cat([d1, d2]))
    a_ref, g_ref = location_oracle(inputs, deltas)
    a, g = factors(opt, layer)
    th.testing.assert_close(a, a_ref)
    th.testing.assert_close(g, g_ref)

    # the step: the dense solve of the tied parameters' whole gradient (both uses)
    opt.zero_grad()
    F.mse_loss(model(x), target).backward()
    grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
    before = [layer.weight.detach().clone(), layer.bias.detach().clone()]
    opt.step()
    th.testing.assert_close(
        applied_step(before, [layer.weight, layer.bias]), dense_step(opt, layer, grads, lr, damping)
    )


def test_tied_modules_and_a_module_called_twice_are_the_same_block():
    tied = _tied_pair(tie_bias=True)
    twice = copy.deepcopy(tied)
    twice[2] = twice[0]  # one module, two calls
    results = []
    for model in (tied, twice):
        opt = KFAC(model, lr=0.3, momentum=0.0, kfac_clip=1e9)
        gen = th.Generator().manual_seed(1)
        x, target = th.randn(8, 3, dtype=th.float64, generator=gen), th.randn(8, 3, dtype=th.float64, generator=gen)
        with opt.collect():
            out = model(x)
        opt.update_statistics(sample_loss(out, target))
        opt.zero_grad()
        F.mse_loss(out, target).backward()
        opt.step()
        results.append([*factors(opt, model[0]), *(p.detach() for p in model[0].parameters())])
    for a, b in zip(*results):
        th.testing.assert_close(a, b, rtol=0, atol=0)


def test_tied_weight_with_different_biases_raises():
    with pytest.raises(ValueError, match="0 and 2 share their weight but not their bias"):
        KFAC(_tied_pair(tie_bias=False))
    model = _tied_pair(tie_bias=False)
    model[2].bias = None
    with pytest.raises(ValueError, match="0 and 2 share their weight"):
        KFAC(model)


class TiedEmbedding(nn.Module):
    """A language-model-style tie: the output layer's weight is the input embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(5, 4), nn.Linear(4, 5)
        self.out.weight = self.embed.weight

    def forward(self, tokens: th.Tensor) -> th.Tensor:
        return self.out(th.tanh(self.embed(tokens)))


def test_parameter_with_a_use_outside_its_block_raises():
    with pytest.raises(ValueError, match=r"weight of out is also used as embed\.weight"):
        KFAC(TiedEmbedding())
    # a bias shared by layers with different weights
    th.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].bias = model[0].bias
    with pytest.raises(ValueError, match="0 and 2 share their bias but not their weight"):
        KFAC(model)
    # a tied pair of which only one module is covered
    model = _tied_pair(tie_bias=True)
    with pytest.raises(ValueError, match=r"weight of 0 is also used as 2\.weight"):
        KFAC(model, modules=[model[0]])
    # a weight shared with a layer K-FAC skips (grouped convolution)
    conv, grouped = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1, groups=2)
    grouped.weight = nn.Parameter(th.zeros(2, 1, 1, 1))
    grouped.bias = conv.bias
    with (
        pytest.warns(UserWarning, match="grouped"),
        pytest.raises(ValueError, match=r"bias of 0 is also used as 1\.bias"),
    ):
        KFAC(nn.Sequential(conv, grouped))
    # the same module holding its own weight a second time, under another name
    layer = nn.Linear(3, 2)
    layer.alias = layer.weight
    with pytest.raises(ValueError, match=r"weight of 0 is also used as 0\.alias"):
        KFAC(nn.Sequential(layer))


def test_conv_model_trains_and_grouped_conv_is_skipped():
    th.manual_seed(0)
    with pytest.warns(UserWarning, match="grouped convolution"):
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=2),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 1),
        )
        opt = KFAC(model, lr=0.1, kfac_clip=0.01)
    assert [block.name for block in opt.blocks] == ["0", "4"]
    x, y = th.randn(32, 2, 8, 8), th.randn(32, 1)
    initial = F.mse_loss(model(x), y).item()
    for _ in range(30):
        regression_step(model, opt, x, y)
    assert F.mse_loss(model(x), y).item() < 0.7 * initial
