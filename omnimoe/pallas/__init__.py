"""Pallas GPU kernels (Triton lowering) behind `omnimoe.ops` with impl="pallas".

  router_topk    fused product-key top-k (`cartesian_topk`)
  expert_ops     atomic experts with a custom VJP (`atomic_experts`), over
  expert_tokens  token-centric forward and dx / dweights kernels
  expert_tables  expert-centric dU / dV segment sums on tensor cores
  bucketing      pairs grouped by expert bucket (histogram, prefix sum, placement)
  common         launch plumbing; off-GPU the kernels run in Pallas interpret mode

Each kernel's reference is in `omnimoe.reference`; experiments/kernels_notes.md holds
the measurements behind the design choices.
"""
