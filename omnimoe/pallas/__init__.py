"""Pallas GPU kernels (Triton lowering) behind `omnimoe.ops` with impl="pallas".

  router_topk       fused product-key top-k (`cartesian_topk`), k <= 128
  router_threshold  exact top-k for k in the thousands: threshold search + bounded emit
                    (`cartesian_topk`, `threshold` for membership tests in other kernels)
  expert_ops        atomic experts with a custom VJP (`atomic_experts`), over
  expert_tokens     token-centric forward and dx / dweights kernels
  expert_tables     expert-centric dU / dV segment sums on tensor cores
  bucketing         pairs grouped by expert bucket (histogram, prefix sum, placement)
  common            launch plumbing; off-GPU the kernels run in Pallas interpret mode

Each kernel's reference is in `omnimoe.reference`; experiments/kernels_notes.md holds
the measurements behind the design choices.
"""
