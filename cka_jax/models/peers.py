"""MCL-OKD's network-based peers: M ResNets of one architecture, each with a linear embedding
head on its pooled features (``papers/mcl-okd-multi-view-contrastive.md``, Sec. 3, Fig. 1).
The last peer is the leader, the network kept for deployment."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cka_jax.models.resnet import ARCHITECTURES, ResNet


class PeerNetworks(nn.Module):
    """``apply(variables, x, train)`` -> ``(logits (M, B, C), embeddings (M, B, embed_dim))``.

    Peer m is the submodule ``peer{m}`` (a `ResNet`, so one peer's variables load as a
    plain model checkpoint) and ``embed{m}`` its linear embedding (the contrast space).
    """

    arch: str
    num_classes: int
    num_peers: int = 4
    embed_dim: int = 128
    width: int = 64
    stem: str = "imagenet"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.num_peers < 2:
            raise ValueError(f"MCL-OKD needs at least 2 peers, got num_peers={self.num_peers}")
        stage_sizes, block = ARCHITECTURES[self.arch]
        logits, embeddings = [], []
        for m in range(self.num_peers):
            peer = ResNet(
                stage_sizes=stage_sizes, block=block, num_classes=self.num_classes,
                width=self.width, stem=self.stem, bn_axis_name=self.bn_axis_name,
                dtype=self.dtype, name=f"peer{m}",
            )  # fmt: skip
            peer_logits, features = peer(x, train=train)
            pooled = jnp.mean(features, axis=(1, 2))
            embed = nn.Dense(self.embed_dim, dtype=self.dtype, name=f"embed{m}")(pooled)
            logits.append(peer_logits)
            embeddings.append(embed.astype(jnp.float32))
        return jnp.stack(logits), jnp.stack(embeddings)
