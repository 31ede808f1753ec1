import pytest
import torch

from scalable_rec.graph import RatingGraph
from scalable_rec.train.model import ModelConfig, Recommender


@pytest.mark.parametrize("decoder", ["dot", "mlp"])
def test_score_block_equals_pairwise_decoder(tiny_shards, decoder):
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, decoder=decoder),
                        rating_mean=3.5).eval()
    z = model.encode_all(g.hetero_data())
    users, movies = torch.arange(7), torch.arange(g.num_movies)
    block = model.score_block(z, users, movies)
    uu, mm = torch.meshgrid(users, movies, indexing="ij")
    pairwise = model.decoder(z["user"][uu.flatten()], z["movie"][mm.flatten()], uu.flatten(), mm.flatten())
    torch.testing.assert_close(block, pairwise.view(7, -1) + 3.5, rtol=1e-5, atol=1e-5)


def test_mlp_block_chunking_is_exact():
    from scalable_rec.train.model import MLPDecoder
    dec = MLPDecoder(8)
    zu, zm = torch.randn(5, 8), torch.randn(11, 8)
    ids_u, ids_m = torch.arange(5), torch.arange(11)
    torch.testing.assert_close(dec.score_block(zu, zm, ids_u, ids_m, max_elements=8 * 11),
                               dec.score_block(zu, zm, ids_u, ids_m))


def test_message_passing_aggregates_in_fp32_under_autocast(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
    seen = []
    for conv in model.encoder.convs:
        for sage in conv.convs.values():
            sage.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_all(g.hetero_data())
    assert seen and all(dt == torch.float32 for dt in seen)


def test_model_config_validation():
    with pytest.raises(ValueError, match="'decoder' needs to be 'dot' or 'mlp'"):
        ModelConfig(decoder="bilinear")
    with pytest.raises(ValueError, match="'hidden' needs to be positive.*'num_layers'"):
        ModelConfig(hidden=0, num_layers=0)
