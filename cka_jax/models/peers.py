"""MCL-OKD's peers: M ResNets of one architecture, each with a linear embedding head on its
pooled features (Yang et al., "Multi-view Contrastive Learning for Online Knowledge
Distillation", Sec. 3, Fig. 1). Network-based
(independent networks) or branch-based (the stem and first stages shared as one trunk, as in
ONE and CL-ILR). The last peer is the leader, the network kept for deployment."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cka_jax.models.resnet import ResNet


class PeerNetworks(nn.Module):
    """``apply(variables, x, train)`` -> ``(logits (M, B, C), embeddings (M, B, embed_dim))``.

    ``peer`` is the architecture of every peer (e.g. ``create_model('resnet18', C)``). Peer
    m is the submodule ``peer{m}``, a copy of it, so one peer's variables load as a plain
    model checkpoint; ``embed{m}`` is its linear embedding (the contrast space). With
    ``shared_stages`` = k > 0 the stem and the first k stages are one submodule ``shared``
    and ``peer{m}`` holds the rest (branch-based); the leader is ``shared`` + its branch.
    """

    peer: ResNet
    num_peers: int = 4
    embed_dim: int = 128
    shared_stages: int = 0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.num_peers < 2:
            raise ValueError(f"MCL-OKD needs at least 2 peers, got num_peers={self.num_peers}")
        if not 0 <= self.shared_stages < len(self.peer.stage_sizes):
            raise ValueError(
                f"shared_stages={self.shared_stages}: share 0 (network-based peers) to "
                f"{len(self.peer.stage_sizes) - 1} of the {len(self.peer.stage_sizes)} stages"
            )
        branch = {}
        if self.shared_stages:
            trunk = self.peer.clone(parent=self, name="shared", last_stage=self.shared_stages)
            x = trunk(x, train=train)
            branch = {"first_stage": self.shared_stages}
        logits, embeddings = [], []
        for m in range(self.num_peers):
            peer = self.peer.clone(parent=self, name=f"peer{m}", **branch)
            peer_logits, features = peer(x, train=train)
            pooled = jnp.mean(features, axis=(1, 2))
            embed = nn.Dense(self.embed_dim, dtype=self.peer.dtype, name=f"embed{m}")(pooled)
            logits.append(peer_logits)
            embeddings.append(embed.astype(jnp.float32))
        return jnp.stack(logits), jnp.stack(embeddings)

    def leader_variables(self, variables) -> dict:
        """The leader's variables, as those of a plain ``peer`` ResNet (what is deployed)."""
        name = f"peer{self.num_peers - 1}"
        return {
            kind: {**tree.get("shared", {}), **tree[name]}
            for kind, tree in variables.items()
            if name in tree
        }
