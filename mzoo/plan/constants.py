"""The planner's constants; docs/plan.md says where each comes from."""

GIB = 2**30

GEMM_EFFICIENCY = 0.55  # of the bf16 peak, sustained by a whole transformer layer
ENGINE_EFFICIENCY = 0.37  # mzoo's eager pure-torch layers (torchtitan's eager class; docs/plan.md): unmeasured
HEADROOM = 0.05  # of a GPU's memory left free: allocator fragmentation and caching slack
FP8_EFFICIENCY = 0.40  # of the fp8 peak, for the linear layers under --fp8
LINK_EFFICIENCY = 0.80  # NCCL bus bandwidth / link bandwidth
HBM_EFFICIENCY = 0.80  # optimizer step: streaming reads and writes
COLLECTIVE_LATENCY_S = 10e-6  # fixed cost of launching one collective
MEGATRON_OVERHEAD_GIB = 4.0  # CUDA context, NCCL communicators, cuBLAS/TE workspaces, allocator slack
DDP_BUCKET_ELEMENTS = 40_000_000  # Megatron DDP bucket: max(40M, 1M x DP) elements
TOKENS_PER_BATCH = 4 * 2**20  # default global batch: about 4M tokens (Llama 3, GPT-3 scale)
MAX_VPP = 128  # virtual stages per rank the planner tries: published recipes use 5-8; each one adds p2p
MIN_CP_TOKENS = 1024  # context parallelism only down to this many tokens per rank (kernels stay efficient)
COMM_BYTES = 2  # activations travel in bf16
FP8_WEIGHT_BYTES = 2  # --fp8: Transformer Engine caches each weight in fp8, and its transpose
