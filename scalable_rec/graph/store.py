"""PyG ``FeatureStore`` and ``GraphStore`` over the memory-mapped graph index.

``LinkNeighborLoader((feature_store, graph_store), ...)`` then samples straight from the
mapped CSC files (no ``to_csc`` copy of the edge index per process, as ``HeteroData``
input needs) and gathers movie features row by row from the mapped feature matrix.
The stores hold tensor references only: what they hold is whatever was put into them,
and ``open_stores`` puts the index's mapped tensors there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import EdgeAttr, FeatureStore, GraphStore, TensorAttr
from torch_geometric.data.graph_store import EdgeLayout

from scalable_rec.graph.config import StoreConfig  # noqa: F401 - re-exported
from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.index import GraphIndex


class MappedFeatureStore(FeatureStore):
    """Node features by ``(node type, attribute)``; rows are gathered per request."""

    def __init__(self) -> None:
        super().__init__()
        self._tensors: dict[tuple[str, str], Tensor] = {}

    def _put_tensor(self, tensor: Tensor, attr: TensorAttr) -> bool:
        if attr.index is not None and not (isinstance(attr.index, slice) and attr.index == slice(None)):
            raise ValueError(f"'index' of a put needs to be None: the store holds whole tensors (got {attr.index})")
        self._tensors[(attr.group_name, attr.attr_name)] = tensor
        return True

    def _get_tensor(self, attr: TensorAttr) -> Tensor | None:
        tensor = self._tensors.get((attr.group_name, attr.attr_name))
        if tensor is None:
            raise KeyError(f"No tensor '{attr.attr_name}' of '{attr.group_name}' in {self}")
        index = attr.index
        if index is None or (isinstance(index, slice) and index == slice(None)):
            return tensor
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        # Advanced indexing gathers the rows into a new (private, batch-sized) tensor.
        return tensor[index]

    def _remove_tensor(self, attr: TensorAttr) -> bool:
        return self._tensors.pop((attr.group_name, attr.attr_name), None) is not None

    def _get_tensor_size(self, attr: TensorAttr) -> tuple[int, ...] | None:
        tensor = self._tensors.get((attr.group_name, attr.attr_name))
        return None if tensor is None else tuple(tensor.shape)

    def get_all_tensor_attrs(self) -> list[TensorAttr]:
        return [TensorAttr(group, name) for group, name in self._tensors]


class MappedGraphStore(GraphStore):
    """Edge indexes by ``(edge type, layout)``; CSC entries are what the sampler reads."""

    def __init__(self) -> None:
        super().__init__()
        self._edges: dict[tuple[tuple[str, str, str], EdgeLayout], tuple[EdgeAttr, tuple[Tensor, Tensor]]] = {}

    def _put_edge_index(self, edge_index: tuple[Tensor, Tensor], edge_attr: EdgeAttr) -> bool:
        if edge_attr.size is None:
            raise ValueError(
                f"'size' of edge type {edge_attr.edge_type} needs to be given (the sampler infers node counts from it)"
            )
        self._edges[(edge_attr.edge_type, edge_attr.layout)] = (edge_attr, edge_index)
        return True

    def _get_edge_index(self, edge_attr: EdgeAttr) -> tuple[Tensor, Tensor] | None:
        entry = self._edges.get((edge_attr.edge_type, edge_attr.layout))
        return None if entry is None else entry[1]

    def _remove_edge_index(self, edge_attr: EdgeAttr) -> bool:
        return self._edges.pop((edge_attr.edge_type, edge_attr.layout), None) is not None

    def get_all_edge_attrs(self) -> list[EdgeAttr]:
        return [attr for attr, _ in self._edges.values()]


def open_stores(index: GraphIndex, subset: str) -> tuple[MappedFeatureStore, MappedGraphStore]:
    """The ``(feature_store, graph_store)`` pair of one edge subset of ``index``.

    ``subset``: ``train`` (training message passing), ``seen`` (train + validation) or
    ``all``. Users have no features; a zero-width ``x`` (no bytes) makes them a node type
    the sampler sees. Each edge type's ratings in CSC order are in the feature store as
    ``(edge type, "rating")`` (``edge_ratings``): PyG's loaders gather no edge attributes
    from a store pair, so batches look them up by their ``e_id``.
    """
    features, graph = MappedFeatureStore(), MappedGraphStore()
    features.put_tensor(index.tensor("movie_x"), group_name=MOVIE, attr_name="x", index=None)
    features.put_tensor(torch.empty(index.num_users, 0), group_name=USER, attr_name="x", index=None)
    csc = index.csc(subset)
    ratings = index.csc_rating(subset)
    sizes = {RATES: (index.num_users, index.num_movies), REV_RATES: (index.num_movies, index.num_users)}
    for edge_type in (RATES, REV_RATES):
        row, colptr = csc[edge_type[1]]
        graph.put_edge_index((row, colptr), edge_type=edge_type, layout="csc", size=sizes[edge_type], is_sorted=True)
        features.put_tensor(ratings[edge_type[1]], group_name=edge_type, attr_name="rating", index=None)
    return features, graph


def edge_ratings(feature_store: FeatureStore) -> dict[tuple[str, str, str], Tensor]:
    """The ratings ``open_stores`` put in ``feature_store``, by edge type, in CSC order."""
    return {et: feature_store.get_tensor(et, "rating", index=None) for et in (RATES, REV_RATES)}
