"""The report's convolutional VAE (section 2.2): two strided convs per side, or a deeper net."""

from __future__ import annotations

from torch import nn

from bam_vae.models.base import VAE

PADDED = 32  # deeper nets see the image zero-padded to 32 x 32, as RAE's network (Ghosh et al.)


def feature_size(channels: list[int]) -> int:
    """Side of the last feature map: 28 -> 14 -> 7 for two convolutions; for three or four,
    the padded 32 x 32 image halves each time (32 -> 16 -> 8 -> 4 -> 2)."""
    return 7 if len(channels) == 2 else PADDED // 2 ** len(channels)


def conv_features(channels: list[int], batch_norm: bool = False) -> list[nn.Module]:
    """4x4 stride-2 convolutions, one per entry of ``channels`` (each followed by batch
    normalisation if asked, then ReLU), flattened: 1 x 28 x 28 -> c_last * s * s.

    The last ReLU comes after the flatten (the same function): the flatten's gradient is
    row-major, and a ReLU whose output is channels-last (bf16) would take its backward in the
    other layout, much slower than with matching layouts (``bench/train_throughput.py``)."""
    layers: list[nn.Module] = [nn.ZeroPad2d((PADDED - 28) // 2)] if len(channels) > 2 else []
    for i, (c_in, c_out) in enumerate(zip([1, *channels], channels, strict=False)):
        layers.append(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1))
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers += [nn.Flatten(), nn.ReLU()] if i == len(channels) - 1 else [nn.ReLU()]
    return layers


def deconv_decoder(n_in: int, channels: list[int], batch_norm: bool = False) -> list[nn.Module]:
    """A dense layer to c_last x s x s, then 4x4 stride-2 transposed convolutions through
    ``channels`` reversed (with batch normalisation if asked) back to 1 x 28 x 28 logits
    (for a padded net, 32 x 32 cropped to the middle 28 x 28)."""
    size, back = feature_size(channels), channels[::-1]
    layers: list[nn.Module] = [nn.Linear(n_in, back[0] * size * size), nn.ReLU(),
                               nn.Unflatten(1, (back[0], size, size))]  # fmt: skip
    for c_in, c_out in zip(back, back[1:], strict=False):
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
        layers += [nn.BatchNorm2d(c_out), nn.ReLU()] if batch_norm else [nn.ReLU()]
    layers.append(nn.ConvTranspose2d(back[-1], 1, 4, stride=2, padding=1))
    layers += [nn.ZeroPad2d(-((PADDED - 28) // 2))] if len(channels) > 2 else []  # crop
    return layers


class CNNVAE(VAE):
    """The report's net with ``channels = [c1, c2]``; 3-4 entries and ``batch_norm`` give
    deeper ones (``[128, 256, 512, 1024]`` with batch norm: the size of RAE's MNIST net)."""

    def __init__(self, z_dim: int, channels: list[int], batch_norm: bool = False, out: int = 2):
        super().__init__(z_dim)
        flat = channels[-1] * feature_size(channels) ** 2
        self.encoder = nn.Sequential(
            *conv_features(channels, batch_norm), nn.Linear(flat, out * z_dim)
        )
        self.decoder = nn.Sequential(*deconv_decoder(z_dim, channels, batch_norm))
