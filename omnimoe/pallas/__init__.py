"""Pallas GPU kernels (Triton lowering) behind `omnimoe.ops` with impl="pallas".

  router_topk       fused product-key top-k (`cartesian_topk`) for k <= MAX_KERNEL_K (64)
  router_threshold  exact top-k for larger k (thousands): threshold search + bounded emit
                    (`cartesian_topk`; `threshold`, the search alone: the rule path's router)
  expert_ops        atomic experts with a custom VJP (`atomic_experts`), picking a path by
                    density (`choose_path`), over
  expert_tokens     token-centric forward and dx / dweights kernels (k ~ 16..128)
  expert_tables     expert-centric dU / dV segment sums on tensor cores
  bucketing         pairs grouped by expert bucket (histogram, prefix sum, placement)
  expert_buckets    the pair scores in bucket order (`ExpertConfig(pair_scores="buckets")`,
                    opt-in)
  expert_dense      the dense regime (k a sizeable fraction of N) as XLA GEMMs, no kernel
  expert_rule       the same regime routed by the top-k's rule (theta, cut), not pairs:
                    the OmniMoE layer's path where `router.routes_by_rule`; two grid kernels
  second_order      second-order reverse mode of the kernel ops by their references
  expert_lines      expert lines x token tiles on tensor cores (path="lines" only), over
  lines             the token-line incidences those kernels run on (XLA, one zero fill)
  common            launch plumbing; off-GPU the kernels run in Pallas interpret mode

Each kernel's reference is in `omnimoe.reference`; experiments/kernels_notes.md holds
the measurements behind the design choices.
"""
