"""MCL-OKD's network-based peers: M independent ResNets with linear embeddings; each peer is
exactly the ResNet of its architecture (its variables apply to a plain model)."""

import jax
import numpy as np
import pytest

from cka_jax.models import create_model, init_variables
from cka_jax.models.peers import PeerNetworks


def test_peers_are_independent_resnets_with_linear_embeddings():
    single = create_model("resnet10", 5, stem="small", width=4)
    peers = PeerNetworks(single, num_peers=3, embed_dim=16)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = init_variables(peers, 0, x.shape)
    logits, embeddings = jax.jit(peers.apply)(variables, x)
    assert logits.shape == (3, 2, 5) and embeddings.shape == (3, 2, 16)
    kernels = []
    for m in range(3):
        peer_vars = {k: variables[k][f"peer{m}"] for k in ("params", "batch_stats")}
        want_logits, features = jax.jit(single.apply)(peer_vars, x)
        np.testing.assert_allclose(logits[m], want_logits, rtol=1e-5, atol=1e-6)
        dense = variables["params"][f"embed{m}"]
        pooled = np.asarray(features).mean(axis=(1, 2))
        want_embed = pooled @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
        np.testing.assert_allclose(embeddings[m], want_embed, rtol=1e-4, atol=1e-5)
        kernels.append(np.asarray(peer_vars["params"]["conv1"]["kernel"]))
    assert not np.allclose(kernels[0], kernels[1])  # initialised independently


def test_fewer_than_two_peers_is_an_error():
    with pytest.raises(ValueError, match="at least 2 peers"):
        peer = create_model("resnet10", 5, stem="small", width=4)
        init_variables(PeerNetworks(peer, num_peers=1), 0, (1, 8, 8, 3))


def test_branch_based_peers_share_their_trunk_and_the_leader_is_a_plain_resnet():
    single = create_model("resnet10", 5, stem="small", width=4)
    peers = PeerNetworks(single, num_peers=3, embed_dim=16, shared_stages=2)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = init_variables(peers, 0, x.shape)
    params = variables["params"]
    # One stem and stages 1-2 for all peers; each branch holds stages 3-4 and its classifier.
    assert {"conv1", "bn1", "layer1_0", "layer2_0"} == set(params["shared"])
    assert {"layer3_0", "layer4_0", "fc"} == set(params["peer0"])
    logits, embeddings = jax.jit(peers.apply)(variables, x)
    assert logits.shape == (3, 2, 5) and embeddings.shape == (3, 2, 16)
    leader = peers.leader_variables(variables)
    apply = jax.jit(single.apply)
    np.testing.assert_allclose(apply(leader, x)[0], logits[-1], rtol=1e-5, atol=1e-6)
    first = {k: {**v["shared"], **v["peer0"]} for k, v in variables.items()}
    np.testing.assert_allclose(apply(first, x)[0], logits[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits[0], logits[-1])  # branches initialised independently
    with pytest.raises(ValueError, match="shared_stages=4"):
        PeerNetworks(single, num_peers=2, shared_stages=4).init(jax.random.key(0), x)
