"""Cross-architecture merging: residual-stream alignment (orthogonal Procrustes), width
projection and the ``procrustes_absorb`` merge.

* :func:`align` - rotate a donor's residual stream onto an anchor's and write the aligned
  donor under the anchor's names (see :mod:`.align` for the conventions: norm folding,
  vocabulary matching, depth mapping);
* :func:`procrustes_absorb` - absorb low-rank, tolerance-filtered, aligned deltas of donors
  of any supported family into an anchor with blend β (β = 1: the anchor byte for byte);
  :func:`procrustes_absorb_params` takes one dict of parameters (config entry point);
* :mod:`.projection` - ``W' = P_out W P_inᵀ`` between widths;
* :func:`graft_attention` - a body's attention replaced by a donor's of another family and
  width, projected and regrouped to the body's heads (Qemma card).
"""
from __future__ import annotations

from .absorb import AbsorbResult, filter_delta, procrustes_absorb, procrustes_absorb_params
from .align import AlignResult, align, depth_map
from .graft import GraftResult, graft_attention, head_groups
from .projection import match_axis, project, subspace_map

#: Methods usable by name from configs: name -> function taking one dict of parameters.
METHODS = {"procrustes_absorb": procrustes_absorb_params}

__all__ = [
    "align", "AlignResult", "depth_map",
    "procrustes_absorb", "procrustes_absorb_params", "AbsorbResult", "filter_delta",
    "project", "subspace_map", "match_axis", "METHODS",
    "graft_attention", "GraftResult", "head_groups",
]
